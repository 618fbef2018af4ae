"""What an equifed round costs over a bare Flower app with the same model, data and local steps.

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 4] [--n 300] [--image-size 64] [--epochs 2]

One SuperLink (simulation engine, one Ray actor: the sites train one after the other) runs, in turn:
- "minimal": this file as a Flower app: Flower's FedAvg, no evaluation; each site loads and splits its folder as
  equifed's client does (client.site.open_site, once per process), trains the same network with the same optimiser,
  batch size, learning rate and local epochs on its train split, and returns the weights;
- "equifed lean": `equifed-simulate --superlink` on the same two site folders, no holdout and no per-site
  evaluation (-c fraction-evaluate=0 -c holdout-path=);
- "equifed": the same with equifed's defaults (the holdout scored each round, every site's evaluate round).
Each ServerApp stamps the time as each round's evaluation starts (equifed: metrics.csv elapsed_s); a round's time is
the difference between consecutive stamps, and round 1 (Ray's actor, the data loading) is left out of the median.
Where the difference goes, timed again in this process: equifed's per-round server steps on the run's own files
(the checkpoint, the tables, the run page, the holdout's evaluation) and a site's train handler (equifed's ClientApp
against the minimal one, the same global model and round: the session's checks, the validation score, the reply);
what is left is Flower's messaging of the larger records and the machine's noise (2 shared cores: rerun to see it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from client.site import list_sites, open_site
from core_models.config import run_config_of
from core_models.model_factory import ModelSpec
from core_models.training import make_loader, train_epochs

# the training keys both apps are given (the equifed defaults without DP, spelled out)
TRAIN_KEYS = ("image-size", "local-epochs", "batch-size", "learning-rate", "optimizer", "model", "seed")

# --- the minimal Flower app (its FAB is this file and a pyproject.toml) --------------------------------------------

server = ServerApp()
client = ClientApp()


def _train_config(run_config) -> object:
    return run_config_of({k: run_config[k] for k in TRAIN_KEYS}).train


@server.main()
def _minimal_server(grid: Grid, context: Context) -> None:
    train = _train_config(context.run_config)
    torch.manual_seed(train.seed)
    model = ModelSpec.of_run(train).build()
    stamps: list[float] = []

    def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stamps.append(time.time())
        return MetricRecord({})

    started = time.time()
    FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=int(context.run_config["rounds"]),
        evaluate_fn=stamp)
    Path(str(context.run_config["stamps"])).write_text(json.dumps({"started": started, "stamps": stamps}))


@client.train()
def _minimal_train(msg: Message, context: Context) -> Message:
    train = _train_config(context.run_config)
    path = list_sites(Path(str(context.run_config["data-root"])))[int(context.node_config["partition-id"])]
    site = open_site(path, train.image_size, train.seed)
    x, y = site.part("train")
    model = ModelSpec.of_run(train).build()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    server_round = int(msg.content["config"]["server-round"])
    train_epochs(model, make_loader(x, y, train.batch_size, shuffle=True, seed=train.seed + server_round),
                 epochs=train.local_epochs, optimizer=train.optimizer, lr=train.learning_rate,
                 weight_decay=train.weight_decay, device=torch.device("cpu"))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(content=content, reply_to=msg)


PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "overhead-minimal"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "equifed"

[tool.flwr.app.components]
serverapp = "bench_overhead:server"
clientapp = "bench_overhead:client"

[tool.flwr.app.config]
rounds = 3
data-root = ""
stamps = ""
image-size = 64
local-epochs = 2
batch-size = 16
learning-rate = 0.002
optimizer = "adam"
model = "cnn"
seed = 0
"""

SCENARIO = """name = "overhead"
seed = 3
image_size = {size}

[defaults]
n = {n}
prevalence = 0.4

[[sites]]
name = "alpha"

[[sites]]
name = "beta"

[holdout]
n = {n}
"""


# --- the benchmark ---------------------------------------------------------------------------------------------------


def round_seconds(stamps: list[float]) -> list[float]:
    """Seconds of each round 1..R from the R+1 stamps (round 0's evaluation first)."""
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_minimal(link, data: Path, work: Path, train: dict, rounds: int, timeout: float) -> list[float]:
    app = work / "minimal_app"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    shutil.copy(Path(__file__), app / "bench_overhead.py")
    out = work / "minimal_stamps.json"
    run_id = link.submit(app, {"rounds": rounds, "data-root": str(data), "stamps": str(out), **train},
                         {"num-supernodes": 2, "client-resources-num-cpus": 2})
    status = link.wait(run_id, timeout=timeout, ending=out.exists)
    if status.get("status") != "finished:completed":
        raise RuntimeError(f"the minimal app's run {run_id}: {link.outcome(status)}\n{link.logs(run_id)[-3000:]}")
    return round_seconds(json.loads(out.read_text())["stamps"])


def run_equifed(link, data: Path, out: Path, train: dict, rounds: int, extra: list[str]) -> list[float]:
    from simulations.run import main as simulate

    argv = ["--sites", str(data), "--out", str(out), "--rounds", str(rounds), "--superlink", link.address,
            "--insecure", "--cpus-per-client", "2", *extra]
    for key, value in train.items():
        argv += ["-c", f"{key}={value}"]
    if simulate(argv) != 0:
        raise RuntimeError(f"equifed run in {out} failed")
    return round_seconds(list(pd.read_csv(out / "metrics.csv")["elapsed_s"]))


def client_steps(data: Path, train: dict, repeats: int = 4) -> dict[str, float]:
    """Seconds of one site's train handler, equifed's and the minimal one's (interleaved, data already loaded), and
    of the validation score equifed's adds."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import train as equifed_train
    from core_models.config import app_defaults
    from core_models.processes import APP_DIR
    from core_models.training import evaluate

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1  # as Flower's runtime sets them
    defaults = app_defaults(APP_DIR / "pyproject.toml")
    node = {"partition-id": 0, "num-partitions": 2}
    equifed = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                      run_config={**defaults, **train, "data-root": str(data)})
    minimal = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                      run_config={**train, "data-root": str(data), "rounds": 1, "stamps": ""})
    spec = ModelSpec.of_run(_train_config(train))

    def message(server_round: int) -> Message:
        content = RecordDict({"arrays": ArrayRecord(spec.build().state_dict()),
                              "config": ConfigRecord({"server-round": server_round})})
        return Message(content=content, dst_node_id=7, message_type="train")

    handlers = {"equifed": lambda r: equifed_train(message(r), equifed),
                "minimal": lambda r: _minimal_train(message(r), minimal)}
    for handler in handlers.values():
        handler(1)  # the data loaded and split once, as in a run's first round
    seconds = {name: 0.0 for name in handlers}
    for r in range(2, 2 + repeats):
        for name, handler in handlers.items():
            t0 = time.perf_counter()
            handler(r)
            seconds[name] += (time.perf_counter() - t0) / repeats
    site = open_site(list_sites(data)[0], int(train["image-size"]), int(train["seed"]))
    model = spec.build()
    t0 = time.perf_counter()
    for _ in range(repeats):
        evaluate(model, make_loader(*site.part("val"), 256), torch.device("cpu"))
    seconds["validation score"] = (time.perf_counter() - t0) / repeats
    return seconds


def server_steps(run: Path, train: dict, holdout: Path | None, repeats: int = 5) -> dict[str, float]:
    """Seconds of equifed's per-round server steps, timed here on a finished run's own files."""
    from core_models.run_files import METRICS_CSV, PER_SITE_CSV
    from server.checkpoint import save_checkpoint
    from server.hooks import HoldoutEvaluation
    from server.run_page import write_run_page

    cfg = run_config_of(train)
    state = ModelSpec.of_run(cfg.train).build().state_dict()
    rows = pd.read_csv(run / METRICS_CSV).to_dict("records")
    sites = pd.read_csv(run / PER_SITE_CSV).to_dict("records")
    scratch = Path(tempfile.mkdtemp(prefix="overhead-steps-"))
    for name in (METRICS_CSV, PER_SITE_CSV, "summary.json"):
        if (run / name).exists():
            shutil.copy(run / name, scratch / name)
    steps = {
        "checkpoint (model, strategy state, history)":
            lambda: save_checkpoint(scratch, 1, state, {}, {"global": rows, "sites": sites, "best": {}}),
        "tables (metrics.csv, per_site.csv)":
            lambda: (pd.DataFrame(rows).to_csv(scratch / METRICS_CSV, index=False),
                     pd.DataFrame(sites).to_csv(scratch / PER_SITE_CSV, index=False)),
        "run page (index.html)": lambda: write_run_page(scratch),
    }
    if holdout is not None:
        evaluation = HoldoutEvaluation(cfg.train, holdout)
        steps["holdout evaluation"] = lambda: evaluation.metrics(evaluation.model)
    seconds = {}
    for name, step in steps.items():
        step()  # warm
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        seconds[name] = (time.perf_counter() - t0) / repeats
    shutil.rmtree(scratch, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="rounds per run (round 1 is left out of the median)")
    p.add_argument("--n", type=int, default=300, help="patients per site (and in the holdout)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="local epochs")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--keep", metavar="DIR", help="keep the runs here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (round 1 carries the start-up and is left out)")
    from server.superlink import LocalSuperLink
    from simulations.generator import generate_consortium

    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="equifed-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    train = {"image-size": args.image_size, "local-epochs": args.epochs, "batch-size": 16, "learning-rate": 0.002,
             "optimizer": "adam", "model": "cnn", "seed": 0}
    try:
        (work / "overhead.toml").write_text(SCENARIO.format(size=args.image_size, n=args.n))
        data = work / "data"
        generate_consortium(work / "overhead.toml", data)
        seconds: dict[str, list[float]] = {}
        with LocalSuperLink(log_path=work / "superlink.log") as link:
            print(f"SuperLink {link.address}; 2 sites x {args.n} patients, {args.image_size} px, cnn, "
                  f"{args.epochs} local epoch(s), {args.rounds} rounds per run", flush=True)
            seconds["minimal"] = run_minimal(link, data, work, train, args.rounds, args.timeout)
            seconds["equifed lean"] = run_equifed(link, data, work / "lean", train, args.rounds,
                                                  ["-c", "fraction-evaluate=0", "-c", "holdout-path="])
            seconds["equifed"] = run_equifed(link, data, work / "default", train, args.rounds, [])
        steps = server_steps(work / "default", train, data / "holdout")
        site = client_steps(data, train)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    median = {name: float(np.median(values[1:])) for name, values in seconds.items()}
    print("\nseconds per round (round 1 left out of the median):")
    for name, values in seconds.items():
        print(f"  {name:13s} {', '.join(f'{v:.2f}' for v in values)}  median {median[name]:.2f}  "
              f"({median[name] / median['minimal']:.2f}x minimal)")
    print("\nequifed's server steps per round (timed here on the run's files):")
    for name, value in steps.items():
        print(f"  {name:45s} {value * 1000:7.1f} ms")
    print("one site's train handler (here, data loaded):")
    for name, value in site.items():
        print(f"  {name:45s} {value * 1000:7.1f} ms")
    server = sum(v for k, v in steps.items() if k != "holdout evaluation")
    client = 2 * (site["equifed"] - site["minimal"])  # the two sites train one after the other
    extra = median["equifed lean"] - median["minimal"]
    print(f"\nequifed lean - minimal: {extra:+.2f} s per round: server steps {server:.2f} s, the two sites' handlers "
          f"{client:+.2f} s (of which validation scores {2 * site['validation score']:.2f} s), the rest "
          f"{extra - server - client:+.2f} s (messaging, noise)")
    print(f"equifed - equifed lean: {median['equifed'] - median['equifed lean']:+.2f} s per round: the holdout's "
          f"evaluation ({steps.get('holdout evaluation', float('nan')):.2f} s here) and every site's evaluate round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
