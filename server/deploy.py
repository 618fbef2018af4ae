"""The consortium side of a real deployment: key material, the allow-list and the
deployment SuperLink.

A consortium folder holds everything the aggregation server needs, and nothing more:

    consortium.json          sites (name, public key, fingerprint) and server host names
    ca.crt                   the consortium's certificate authority (what each hospital receives)
    server.crt, server.key   the SuperLink's TLS certificate, signed by the CA
    sites/<name>/<name>.pub  the public key hospital <name> made itself (`equifed-client keygen`)
    state/superlink.db       the SuperLink's database: allow-list, runs, messages
    state/flwr-home/         the FLWR_HOME our `flwr` calls use (connection to the SuperLink)

The CA's private key is written outside it (by default `<folder>-ca-offline/ca.key`) and
belongs offline: `start` refuses to run while a CA key sits in the folder. No hospital's
private key is ever made or held here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.certs import PublicKeyError, create_ca, create_server_cert, public_key_fingerprint, read_site_public_key
from core_models.processes import free_port
from server.superlink import CONNECTION, LocalSuperLink, TLSFiles

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


def _save_index(folder: Path, index: dict) -> None:
    tmp = Path(folder) / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, Path(folder) / INDEX)


def default_ca_key_path(folder: Path) -> Path:
    """Where `setup` writes the CA key unless told otherwise: a sibling of the server folder."""
    folder = Path(folder).resolve()
    return folder.parent / f"{folder.name}-ca-offline" / "ca.key"


def _ca_public(folder: Path):
    return x509.load_pem_x509_certificate((Path(folder) / "ca.crt").read_bytes()).public_key()


def _is_ca_key(path: Path, ca_public) -> bool:
    """Whether `path` holds the private key of the CA (any PEM/OpenSSH encoding, any name)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if b"PRIVATE KEY" not in data:
        return False
    for loader in (serialization.load_pem_private_key, serialization.load_ssh_private_key):
        try:
            key = loader(data, password=None)
        except Exception:  # not this encoding, encrypted, or not a key at all
            continue
        return key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == \
            ca_public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return False


def ca_keys_in_folder(folder: Path) -> list[Path]:
    """CA private keys inside the server folder: any file named ca.key, and any *.key/*.pem
    file that is the private key of the folder's ca.crt (whatever it is called)."""
    folder = Path(folder).resolve()
    found = {p for p in folder.rglob("ca.key") if p.is_file()}
    if (folder / "ca.crt").is_file():
        ca_public = _ca_public(folder)
        for path in folder.rglob("*"):
            if path.suffix in (".key", ".pem") and path.is_file() and path.stat().st_size < 65536 \
                    and _is_ca_key(path, ca_public):
                found.add(path)
    return sorted(found)


def hospital_private_keys_in_folder(folder: Path) -> list[Path]:
    """Hospital private keys an older `setup` made and left in sites/<name>/ (it no longer does)."""
    return sorted(p for p in (Path(folder) / "sites").glob("*/*.key") if p.is_file())


def setup_consortium(folder: Path, hosts: list[str], ca_key: Path | None = None) -> tuple[dict, dict]:
    """Create (or extend) a consortium folder: the CA and the server certificate; an existing
    CA and certificate are kept (the certificate is re-issued, with the CA key, when a new
    host is named). The CA key goes to `ca_key` (default `default_ca_key_path`), which must lie
    outside the folder. A CA key left in the folder by an older equifed is moved there.

    Returns (index, facts): facts has "ca_key" (its path), "ca_created", "ca_key_moved_from"
    (a path or None) and "server_cert_issued"."""
    folder = Path(folder).resolve()
    ca_key = Path(ca_key).expanduser().resolve() if ca_key else default_ca_key_path(folder)
    if ca_key.is_relative_to(folder):
        raise ConsortiumError(f"--ca-key {ca_key} is inside the server folder {folder}: the CA key must be kept "
                              f"outside it (and offline)")
    folder.mkdir(parents=True, exist_ok=True)
    index = load_index(folder) if (folder / INDEX).exists() else {"sites": {}, "hosts": []}
    known_hosts = [h for h in index.get("hosts", []) if h not in ALWAYS_HOSTS]
    all_hosts = list(dict.fromkeys(known_hosts + list(hosts) + ALWAYS_HOSTS))  # a new --host adds to the old ones
    facts: dict = {"ca_key": ca_key, "ca_created": False, "ca_key_moved_from": None, "server_cert_issued": False}

    legacy = folder / "ca.key"
    if legacy.exists():
        if ca_key.exists():
            raise ConsortiumError(f"{legacy} is a CA private key inside the server folder, and {ca_key} exists too: "
                                  f"keep the one that belongs to {folder / 'ca.crt'} offline and delete the other")
        ca_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.move(str(legacy), str(ca_key))
        os.chmod(ca_key, 0o600)
        facts["ca_key_moved_from"] = legacy

    if not (folder / "ca.crt").exists():
        if ca_key.exists():
            raise ConsortiumError(f"{ca_key} already holds a CA key but {folder / 'ca.crt'} does not exist: it "
                                  f"belongs to another consortium folder; choose another --ca-key")
        ca_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_ca(folder, ca_key)
        facts["ca_created"] = True
    new_hosts = set(all_hosts) - set(index.get("hosts", []))
    if not (folder / "server.crt").exists() or new_hosts:
        if not ca_key.exists():
            raise ConsortiumError(f"issuing the server certificate (for {', '.join(sorted(new_hosts)) or 'the server'}) "
                                  f"needs the CA key, which is not at {ca_key}: bring the offline copy back for "
                                  f"this step and pass its path with --ca-key")
        if not _is_ca_key(ca_key, _ca_public(folder)):
            raise ConsortiumError(f"{ca_key} is not the private key of {folder / 'ca.crt'}")
        create_server_cert(folder, folder / "ca.crt", ca_key, all_hosts)
        index["hosts"] = all_hosts
        facts["server_cert_issued"] = True
    _save_index(folder, index)
    return index, facts


def register_site(folder: Path, name: str, public_key: Path, replace: bool = False) -> tuple[dict, str]:
    """Put hospital `name`'s public key (made by the hospital: `equifed-client keygen`) into the
    consortium folder's allow-list (consortium.json; the SuperLink's database follows with
    `sync_allow_list`). Only a public key is accepted. Returns (entry, "new" | "unchanged" |
    "replaced"); a site already registered with another key needs `replace=True`."""
    folder = Path(folder).resolve()
    index = load_index(folder)
    if not SITE_NAME.match(name):
        raise ConsortiumError(f"site name {name!r}: use letters, digits, '_', '-' or '.'")
    try:
        raw = read_site_public_key(Path(public_key))
    except PublicKeyError as err:
        raise ConsortiumError(str(err)) from None
    fingerprint = public_key_fingerprint(Path(public_key))
    for other, entry in index["sites"].items():
        if other != name and entry["fingerprint"] == fingerprint:
            raise ConsortiumError(f"this public key is already registered for site {other!r}; every hospital "
                                  f"needs its own key pair")
    old = index["sites"].get(name)
    if old is not None and old["fingerprint"] == fingerprint:
        return old, "unchanged"
    if old is not None and not replace:
        raise ConsortiumError(f"site {name!r} is registered with another key ({old['fingerprint'][:23]}…); to "
                              f"replace it (the hospital made a new key pair) add --replace")
    site_dir = folder / "sites" / name
    site_dir.mkdir(parents=True, exist_ok=True)
    pub = site_dir / f"{name}.pub"
    pub.write_bytes(raw + f" equifed-site-{name}\n".encode())
    entry = {"public_key": str(pub.relative_to(folder)), "fingerprint": fingerprint}
    index["sites"][name] = entry
    _save_index(folder, index)
    return entry, "new" if old is None else "replaced"


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
        if entry.get("node_id") in in_db and entry.get("fingerprint") != site["fingerprint"]:
            # the site's key was replaced (`register --replace`): the old key loses its access
            done = link.flwr("supernode", "unregister", entry["node_id"], CONNECTION, "--format", "json")
            try:
                ok = bool(json.loads(done.stdout[done.stdout.index("{"):]).get("success"))
            except ValueError:
                ok = False
            if not ok:
                raise RuntimeError(f"could not unregister {name}'s old key (node {entry['node_id']}):\n"
                                   f"{done.stdout}\n{done.stderr}")
            known.pop(name, None)
        node_id = link.register_node(folder / site["public_key"], name)
        if node_id is not None:
            known[name] = {"fingerprint": site["fingerprint"], "node_id": str(node_id)}
            added.append(name)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(known, indent=1))
    return added
