"""Secure aggregation's cost against the plain train reply, for the default cnn: in one process, and through real
simulations.

    .venv/bin/python benchmarks/bench_secagg.py [--sites 4,20] [--reps 3]
    .venv/bin/python benchmarks/bench_secagg.py --simulate [--sites 4,20] [--rounds 3] [--site-n 60] [--out DIR]

Secure: the four stages (advertise keys, share keys, collect masked input, unmask) of client/secagg.py and
server/secagg.py, every request and reply serialised to Flower's protobuf bytes and parsed back, each site's state
through its Context record between stages. Plain: the site's train reply (ArrayRecord of the state dict and the
num-examples MetricRecord) serialised and parsed, and Flower's FedAvg aggregation of the replies on the server.
Both count a site's own compute (mean over the sites, median over the repetitions) and the server's; bytes are the
serialised RecordDicts a site sends (up) and receives (down). The global model each site receives is the same in
both and is counted in neither column. The last column: one site leaves after sharing keys (the server rebuilds
its mask key and removes its pairwise masks). Network round trips are not here: the secure round has 4 where the
plain one has 1.

--simulate: `equifed-simulate` (nice 5, one run at a time) with and without `-c secagg=true`, default run config
(cnn, 64 px, no DP, 2 local epochs, every site evaluating), on the default scenario at 4 sites and, at any other
count, on the default scenario's sites repeated with `--site-n` patients each (holdout 100). A round's time is the
ServerApp's clock between two rounds (metrics.csv elapsed_s; train, the secure sum, evaluation, holdout), the median
over rounds 2.. (round 1 also loads each site's data); the secure sum's own seconds are the ServerApp's log line.
Flower's simulation engine hands messages over in memory and counts no bytes: the bytes per site are the protobuf
sizes of the same records (the model's and the protocol's, at that site count) from the in-process round above.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import serde
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from client import secagg as site
from core_models.networks import build_model
from core_models.secagg import (
    SECAGG,
    EncryptedShares,
    MaskedInput,
    MaskedInputRequest,
    PublicKeys,
    SecAggParams,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
    VectorLayout,
    encode,
)
from server import secagg as server
from simulations.run import DEFAULT_SCENARIO

MAX_WEIGHT = 10_000.0


def wire(record_dict: RecordDict) -> tuple[RecordDict, int]:
    data = serde.recorddict_to_proto(record_dict).SerializeToString()
    return serde.recorddict_from_proto(ProtoRecordDict.FromString(data)), len(data)


class Meter:
    """Seconds and bytes per site, seconds of the server."""

    def __init__(self, nodes):
        self.cpu = {n: 0.0 for n in nodes}
        self.up = {n: 0 for n in nodes}
        self.down = {n: 0 for n in nodes}
        self.server = 0.0

    def send(self, nid, record, down: bool):
        got, size = wire(RecordDict({SECAGG: record}))
        (self.down if down else self.up)[nid] += size
        return got[SECAGG]


def global_model_bytes(model_arrays) -> int:
    return wire(RecordDict({"arrays": ArrayRecord(model_arrays), "config": ConfigRecord({"server-round": 1})}))[1]


def secure_round(arrays, weights, nodes, layout, drop=()) -> Meter:
    meter = Meter(nodes)
    params = SecAggParams.majority(len(nodes), max_weight=MAX_WEIGHT)
    t0 = time.perf_counter()
    srv, request = server.start(params, layout, nodes)
    meter.server += time.perf_counter() - t0
    states, replies = {}, {}
    for nid in nodes:
        req = SecAggParams.from_record(meter.send(nid, request.to_record(), down=True))
        t0 = time.perf_counter()
        state, reply = site.advertise_keys(nid, req, 2)
        states[nid] = wire(RecordDict({"s": state.to_record()}))[0]["s"]
        meter.cpu[nid] += time.perf_counter() - t0
        replies[nid] = PublicKeys.from_record(meter.send(nid, reply.to_record(), down=False))

    def stage(server_step, site_step, request_type, reply_type, extra=None, skip=()):
        nonlocal srv
        t0 = time.perf_counter()
        srv, requests = server_step(srv, replies_now)
        meter.server += time.perf_counter() - t0
        out = {}
        for nid, req in requests.items():
            if nid in skip:
                continue
            req = request_type.from_record(meter.send(nid, req.to_record(), down=True))
            t0 = time.perf_counter()
            state = site.SiteState.from_record(states[nid])
            args = (extra(nid),) if extra else ()
            state, reply = site_step(state, req, *args)
            states[nid] = wire(RecordDict({"s": state.to_record()}))[0]["s"]
            meter.cpu[nid] += time.perf_counter() - t0
            out[nid] = reply_type.from_record(meter.send(nid, reply.to_record(), down=False))
        return out

    def encoded(nid):
        i = nodes.index(nid)
        return encode(arrays[i], weights[i], layout, params)

    replies_now = replies
    replies_now = stage(server.share_keys, site.share_keys, ShareKeysRequest, EncryptedShares)
    replies_now = stage(server.route_shares, site.masked_input, MaskedInputRequest, MaskedInput, encoded, drop)
    replies_now = stage(server.request_unmask, site.unmask, UnmaskRequest, UnmaskShares)
    t0 = time.perf_counter()
    result = server.unmask(srv, replies_now)
    meter.server += time.perf_counter() - t0
    assert result.sites == tuple(n for n in nodes if n not in drop) and result.dropped == tuple(drop)
    return meter


def plain_round(arrays, weights, nodes) -> Meter:
    meter = Meter(nodes)
    received = []
    for nid, a, w in zip(nodes, arrays, weights):
        t0 = time.perf_counter()
        reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in a.items()}),
                            "metrics": MetricRecord({"num-examples": w})})
        got, size = wire(reply)
        meter.cpu[nid] += time.perf_counter() - t0
        meter.up[nid] += size
        received.append(got)
    t0 = time.perf_counter()
    aggregate_arrayrecords(received, "num-examples")
    meter.server += time.perf_counter() - t0
    return meter


def scenario_text(n_sites: int, site_n: int) -> str:
    """The default scenario with its sites repeated to `n_sites`, each of `site_n` patients (holdout 100)."""
    raw = tomllib.loads(DEFAULT_SCENARIO.read_text())
    sites = [{**raw["sites"][i % len(raw["sites"])], "name": f"site_{i:02d}", "n": site_n} for i in range(n_sites)]
    lines = [f"{k} = {_toml(raw[k])}" for k in ("seed", "image_size")] + [f'name = "secagg_{n_sites}"', "",
                                                                         "[defaults]"]
    lines += [f"{k} = {_toml(v)}" for k, v in raw["defaults"].items()]
    for site in sites:
        lines += ["", "[[sites]]", *(f"{k} = {_toml(v)}" for k, v in site.items())]
    return "\n".join(lines + ["", "[holdout]", "n = 100", ""])


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def simulate(n_sites: int, secure: bool, rounds: int, site_n: int, out: Path) -> dict:
    """One `equifed-simulate` run: per-round seconds (metrics.csv) and the secure sum's seconds (flower.log). A run
    already completed in `out` (summary.json) is read again, not repeated."""
    out.mkdir(parents=True, exist_ok=True)
    scenario = DEFAULT_SCENARIO
    if n_sites != 4:
        scenario = out.parent / f"scenario_{n_sites}.toml"
        scenario.write_text(scenario_text(n_sites, site_n))
    cmd = ["nice", "-n", "5", str(Path(sys.executable).parent / "equifed-simulate"), str(scenario), "--out", str(out),
           "--rounds", str(rounds), "--timeout", "1800", *(["-c", "secagg=true"] if secure else [])]
    done = subprocess.run(["true"] if (out / "summary.json").exists() else cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    elapsed = pd.read_csv(out / "metrics.csv").set_index("round")["elapsed_s"]
    per_round = [float(elapsed[r] - elapsed[r - 1]) for r in range(1, rounds + 1)]
    log = (out / "flower.log").read_text()
    # (Flower's log holds each line in two formats)
    sums = list({int(r): float(x) for r, x in re.findall(r"round (\d+): secure sum of \d+ site\(s\), 0 left, "
                                                         r"in ([0-9.]+) s", log)}.values())
    if secure and len(sums) != rounds:
        raise RuntimeError(f"{out}: {len(sums)} complete secure sums in {rounds} rounds; see {out / 'flower.log'}")
    return {"rounds": per_round, "round": statistics.median(per_round[1:] or per_round), "sums": sums}


def simulated_table(sites: list[int], rounds: int, site_n: int, out: Path | None) -> None:
    base = build_model("cnn", 2, 1).state_dict()
    layout = VectorLayout.of(base)
    arrays = {k: v.numpy() for k, v in base.items()}
    root = out or Path(tempfile.mkdtemp(prefix="bench_secagg_"))
    print(f"equifed-simulate, default run config (cnn {layout.size} parameters, 64 px), {rounds} rounds each, "
          f"runs in {root}")
    print("| sites | patients/site | round s plain | round s secure | secure / plain | secure sum s | "
          "up B/site plain | up B/site secure | down B/site plain | down B/site secure | round 1 s plain / secure |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sites:
        plain = simulate(n, False, rounds, site_n, root / f"plain_{n}")
        secure = simulate(n, True, rounds, site_n, root / f"secure_{n}")
        nodes = [1000 + i for i in range(n)]
        weights = [float(100 + 37 * i) for i in range(n)]
        m_plain = plain_round([arrays] * n, weights, nodes)
        m_secure = secure_round([arrays] * n, weights, nodes, layout)
        down_model = global_model_bytes(base)  # the train request, the same in both
        up = lambda m: statistics.mean(m.up.values())  # noqa: E731
        down = lambda m: statistics.mean(m.down.values())  # noqa: E731
        patients = "default (300-450)" if n == 4 else str(site_n)
        print(f"| {n} | {patients} | {plain['round']:.2f} | {secure['round']:.2f} | "
              f"{secure['round'] / plain['round']:.2f}x | {statistics.median(secure['sums']):.2f} "
              f"| {up(m_plain):.0f} | {up(m_secure):.0f} | {down_model:.0f} | {down_model + down(m_secure):.0f} "
              f"| {plain['rounds'][0]:.1f} / {secure['rounds'][0]:.1f} |", flush=True)
        print(f"<!-- {n} sites, per-round seconds: plain {plain['rounds']}, secure {secure['rounds']}, "
              f"secure sums {secure['sums']} -->", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="4,20")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--simulate", action="store_true", help="time real equifed-simulate runs instead")
    parser.add_argument("--rounds", type=int, default=3, help="--simulate: rounds per run")
    parser.add_argument("--site-n", type=int, default=60, help="--simulate: patients per site beyond 4 sites")
    parser.add_argument("--out", type=Path, default=None, help="--simulate: keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.simulate:
        simulated_table([int(s) for s in args.sites.split(",")], args.rounds, args.site_n, args.out)
        return
    gen = torch.Generator().manual_seed(0)
    base = build_model("cnn", 2, 1).state_dict()
    down_model = global_model_bytes(base)
    layout = VectorLayout.of(base)
    print(f"default cnn: {layout.size} parameters; global model request {down_model} bytes (both ways of aggregating)")
    print("| sites | site s plain | site s secure | server s plain | server s secure | up B/site plain | "
          "up B/site secure | down B/site extra (secure) | server s secure, 1 site dropped |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sites.split(",")):
        nodes = [1000 + i for i in range(n)]
        arrays = [{k: (v + 0.05 * torch.randn(v.shape, generator=gen)).numpy() for k, v in base.items()}
                  for _ in range(n)]
        weights = [float(100 + 37 * i) for i in range(n)]
        plain, secure, dropped = [], [], []
        for _ in range(args.reps):
            plain.append(plain_round(arrays, weights, nodes))
            secure.append(secure_round(arrays, weights, nodes, layout))
            dropped.append(secure_round(arrays, weights, nodes, layout, drop=(nodes[-1],)))

        def med(meters, what):
            return statistics.median(what(m) for m in meters)

        site_s = lambda m: statistics.mean(m.cpu.values())  # noqa: E731
        up = lambda m: statistics.mean(m.up.values())  # noqa: E731
        down = lambda m: statistics.mean(m.down.values())  # noqa: E731
        print(f"| {n} | {med(plain, site_s):.4f} | {med(secure, site_s):.3f} | {med(plain, lambda m: m.server):.4f} "
              f"| {med(secure, lambda m: m.server):.3f} | {med(plain, up):.0f} | {med(secure, up):.0f} "
              f"| {med(secure, down):.0f} | {med(dropped, lambda m: m.server):.3f} |")


if __name__ == "__main__":
    main()
