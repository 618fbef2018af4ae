"""The consortium side of a real deployment: key material, the allow-list and the
deployment SuperLink.

A consortium folder holds everything the aggregation server needs:

    consortium.json          sites (name, public key, fingerprint) and server host names
    ca.crt, ca.key           the consortium's certificate authority (keep ca.key offline)
    server.crt, server.key   the SuperLink's TLS certificate, signed by the CA
    sites/<name>/            what hospital <name> receives: <name>.key, <name>.pub, ca.crt
    state/superlink.db       the SuperLink's database: allow-list, runs, messages
    state/flwr-home/         the FLWR_HOME our `flwr` calls use (connection to the SuperLink)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from server.certs import create_ca, create_server_cert, create_site_keys, public_key_fingerprint
from server.superlink import LocalSuperLink, TLSFiles, free_port

INDEX = "consortium.json"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ALWAYS_HOSTS = ["127.0.0.1", "localhost"]  # the server's own `flwr` calls dial the loopback


class ConsortiumError(RuntimeError):
    """A consortium folder that cannot be used as it is; the message says what to do."""


def load_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.exists():
        raise ConsortiumError(f"{folder} is not a consortium folder (no {INDEX}); run `equifed-server setup` first")
    return json.loads(path.read_text())


def setup_consortium(folder: Path, sites: list[str], hosts: list[str],
                     public_keys: dict[str, Path] | None = None) -> dict:
    """Create (or extend) a consortium folder; existing CA, certificate and keys are kept.

    `public_keys` maps a site to a public key the hospital generated itself (its private
    key then never leaves the hospital); other sites get a key pair made here.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    public_keys = dict(public_keys or {})
    index = json.loads((folder / INDEX).read_text()) if (folder / INDEX).exists() else {"sites": {}, "hosts": []}
    for name in list(sites) + list(public_keys):
        if not SITE_NAME.match(name):
            raise ConsortiumError(f"site name {name!r}: use letters, digits, '_', '-' or '.'")
    all_hosts = list(dict.fromkeys(list(hosts) + ALWAYS_HOSTS))

    if not (folder / "ca.crt").exists():
        create_ca(folder)
    if not (folder / "server.crt").exists() or set(all_hosts) - set(index.get("hosts", [])):
        create_server_cert(folder, folder / "ca.crt", folder / "ca.key", all_hosts)
        index["hosts"] = all_hosts

    for name in list(dict.fromkeys(list(sites) + list(public_keys))):
        site_dir = folder / "sites" / name
        site_dir.mkdir(parents=True, exist_ok=True)
        pub = site_dir / f"{name}.pub"
        if name in public_keys:
            shutil.copyfile(public_keys[name], pub)
        elif not pub.exists():
            create_site_keys(site_dir, name)
        shutil.copyfile(folder / "ca.crt", site_dir / "ca.crt")
        index["sites"][name] = {"public_key": str(pub.relative_to(folder)), "fingerprint": public_key_fingerprint(pub)}
    (folder / INDEX).write_text(json.dumps(index, indent=1))
    return index


def deployment_superlink(folder: Path, host: str = "127.0.0.1", port: int | None = None,
                         log_path: Path | None = None) -> LocalSuperLink:
    """The consortium's SuperLink: TLS with the consortium's certificate, SuperNode
    authentication on, state in state/superlink.db (survives a restart)."""
    folder = Path(folder).resolve()
    load_index(folder)
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (folder / name).exists():
            raise ConsortiumError(f"{folder / name} is missing; run `equifed-server setup` again")
    state = folder / "state"
    return LocalSuperLink(
        log_path=log_path or state / "superlink.log", simulation=False, host=host, port=port or free_port(),
        tls=TLSFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key"),
        database=state / "superlink.db", auth=True, home=state / "flwr-home",
    )


def sync_allow_list(link: LocalSuperLink, folder: Path) -> list[str]:
    """Register every site's public key with the running SuperLink; returns the names new
    to its database. `state/registered.json` keeps the node id each key got; a key whose
    node id is still in the database is not sent again (one `flwr` call saved per site)."""
    folder = Path(folder).resolve()
    index = load_index(folder)
    marker = folder / "state" / "registered.json"
    known = json.loads(marker.read_text()) if marker.exists() else {}
    in_db = {str(n["node-id"]) for n in link.nodes() if n.get("status") != "unregistered"}
    added = []
    for name, site in index["sites"].items():
        entry = known.get(name, {})
        if entry.get("fingerprint") == site["fingerprint"] and entry.get("node_id") in in_db:
            continue
        node_id = link.register_node(folder / site["public_key"], name)
        if node_id is not None:
            known[name] = {"fingerprint": site["fingerprint"], "node_id": str(node_id)}
            added.append(name)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(known, indent=1))
    return added
