"""The path-specific penalty in federated training, measured like benchmarks/bench_mitigation.py.

For each seed: ``equifed-simulate`` on the scenario (real SuperLink, Flower simulation engine, 4 sites) without the
penalty and with ``fair-lambda`` = each λ; the last global model is scored on the scenario's holdout and its
counterfactual re-renders with ``bench_mitigation.evaluate`` (true social / permissible PSE, AUROC, worst-group
AUROC, equalized-odds gap). The sites release their (A, stratum) counts once and the global model's score sums every
round (noised, charged to their ledgers); ``epsilon`` is the largest site's ledger total after the run.

    .venv/bin/python -W ignore benchmarks/bench_mitigation_federated.py \
        --scenario simulations/scenarios/social_marker_32.toml --seeds 0,1,2,3,4 --lams 30 --rounds 10
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from client.ledger import PrivacyLedger
from core_models.networks import build_model
from simulations.generator import generate_consortium
from simulations.run import main as simulate
from simulations.scenario import load_scenario, scenario_to_toml, without_social_path

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_mitigation", ROOT / "benchmarks" / "bench_mitigation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_one(scenario: Path, out: Path, seed: int, lam: float, rounds: int, extra: list[str]) -> tuple[torch.nn.Module,
                                                                                                      dict]:
    """One federated run; returns the final global model and run facts."""
    t = time.perf_counter()
    argv = [str(scenario), "--out", str(out), "--rounds", str(rounds), "-c", f"seed={seed}",
            "-c", f"fair-lambda={lam}", "-c", "local-epochs=1", "-c", "batch-size=32", "-c", "fraction-evaluate=0"]
    for item in extra:
        argv += ["-c", item]
    if simulate(argv) != 0:
        raise SystemExit(f"federated run failed: seed {seed}, lambda {lam}; see {out / 'flower.log'}")
    payload = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    model = build_model("cnn")
    model.load_state_dict(payload["model"])
    eps = [PrivacyLedger.open(site, delta=1e-5).epsilon() for site in sorted((out / "data").iterdir())
           if (site / "manifest.csv").exists() and site.name != "holdout"]
    metrics = pd.read_csv(out / "metrics.csv")
    last_pse = metrics["fair_pse"].dropna().iloc[-1] if "fair_pse" in metrics and metrics["fair_pse"].notna().any() \
        else float("nan")
    fair = lam > 0 or "fair-offset=true" in extra
    return model.eval(), {"seconds": round(time.perf_counter() - t, 1), "epsilon": max(eps) if fair else None,
                          "released_pse_last": float(last_pse)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default=str(ROOT / "simulations" / "scenarios" / "social_marker_32.toml"))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lams", default="30")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="extra run config for every run (e.g. fair-form=per-sample)")
    parser.add_argument("--markdown", default="", help="write the seed-mean (sd) table here")
    parser.add_argument("--json", default="")
    parser.add_argument("--offset", action="store_true",
                        help="a 'mediator offset' run (fair-offset, no penalty) and the penalised runs with it")
    parser.add_argument("--s-blind", action="store_true", help="also the federated S-blind reference run")
    parser.add_argument("--fresh-consortium", action="store_true",
                        help="draw the patients anew for every seed (scenario seed + seed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bench = _bench()
    scenario = Path(args.scenario).resolve()
    lams = [float(v) for v in args.lams.split(",") if v.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="equifed-fedmit-") as tmp:
        data, drawn = None, None
        for seed in [int(s) for s in args.seeds.split(",")]:
            if data is None or args.fresh_consortium:
                sc = load_scenario(scenario)
                if args.fresh_consortium:
                    sc = dataclasses.replace(sc, seed=sc.seed + seed)
                    scenario = Path(tmp) / f"scenario-{seed}.toml"
                    scenario.write_text(scenario_to_toml(sc))
                # the holdout and its counterfactual re-renders (the sites' own data are not used)
                data = bench.load_data(scenario, seed=seed)
                drawn = Path(tmp) / f"data-{sc.seed}"
                generate_consortium(sc, drawn)  # once per draw; each run gets a fresh copy
            runs = [(0.0, False)] + [(0.0, True)] * args.offset + [(lam, args.offset) for lam in lams]
            for lam, offset in runs:
                out = Path(tmp) / f"s{seed}-l{lam:g}-{offset}"
                shutil.copytree(drawn, out / "data")  # fresh ledgers: every run starts at epsilon 0
                model, info = run_one(scenario, out, seed, lam, args.rounds,
                                      args.run_config + ["fair-offset=true"] * offset)
                method = "unmitigated" if lam == 0 else f"path-specific penalty (federated) lam={lam:g}"
                method = ("mediator offset" + (" + " + method if lam else "")) if offset else method
                rows.append({"seed": seed, "method": method, **bench.evaluate(
                    lambda x, s, a, m=model: bench.cnn_scores(m, x), data), **info})
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out)
            if args.s_blind:  # the same patients with the A -> S edge cut, scored on S-blind renders
                blind = without_social_path(sc)
                path = Path(tmp) / f"scenario-blind-{seed}.toml"
                path.write_text(scenario_to_toml(blind))
                out = Path(tmp) / f"s{seed}-blind"
                generate_consortium(blind, out / "data")
                model, info = run_one(path, out, seed, 0.0, args.rounds, args.run_config)
                rows.append({"seed": seed, "method": "S-blind reference (federated, social mechanism off)",
                             **bench.blind_aurocs(bench.cnn_scores(model, data["blind"]["test"]), data),
                             "seconds": info["seconds"]})
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    table = bench.markdown_table(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
