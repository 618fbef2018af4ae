"""Secure aggregation's cost against the plain train reply, for the default cnn, in one process.

    .venv/bin/python benchmarks/bench_secagg.py [--sites 4,20] [--reps 3]

Secure: the four stages (advertise keys, share keys, collect masked input, unmask) of client/secagg.py and
server/secagg.py, every request and reply serialised to Flower's protobuf bytes and parsed back, each site's state
through its Context record between stages. Plain: the site's train reply (ArrayRecord of the state dict and the
num-examples MetricRecord) serialised and parsed, and Flower's FedAvg aggregation of the replies on the server.
Both count a site's own compute (mean over the sites, median over the repetitions) and the server's; bytes are the
serialised RecordDicts a site sends (up) and receives (down). The global model each site receives is the same in
both and is counted in neither column. The last column: one site leaves after sharing keys (the server rebuilds
its mask key and removes its pairwise masks). Network round trips are not here: the secure round has 4 where the
plain one has 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="4,20")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
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
