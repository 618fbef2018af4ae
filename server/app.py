"""The equifed ServerApp: runs the chosen strategy, evaluates the global model on a
held-out set when one is configured, checkpoints every round, keeps the best global model
(run config best-by, optional patience), and writes the run folder."""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from core_models.data import load_site
from core_models.networks import build_model
from core_models.training import evaluate, make_loader
from server.checkpoint import (BEST_MODEL, BestTracker, choose_best_metric, load_latest, pooled, restore_best_model,
                               save_checkpoint, save_model)
from server.results import plot_learning_curve, round_table, write_summary, write_tables
from server.privacy_registry import PrivacyRegistry
from server.site_statistics import analyse, request_config, request_statistics, requested_kinds, to_releases
import server.shift  # noqa: F401  (registers the "shift" analyser)
import server.fairness_audit  # noqa: F401  (registers the "fairness" analyser)
from server.strategy import build_strategy
from fairness import mitigation

app = ServerApp()


class RunFailed(RuntimeError):
    """A round in which no site could train: the run cannot make progress."""


class StopEarly(Exception):
    """Raised from the round's evaluation when patience runs out: Flower's strategy loop has no other exit, and
    nothing of the round is left undone by then (its checkpoint and tables are written)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    out_dir = Path(str(cfg["out-dir"])).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    total_rounds = int(cfg["num-server-rounds"])
    torch.manual_seed(int(cfg["seed"]))
    model = build_model(str(cfg["model"]), int(cfg["num-classes"]))
    strategy = build_strategy(str(cfg["strategy"]), cfg)
    strategy.registry = PrivacyRegistry(str(cfg.get("registry-path", "")) or out_dir / "privacy_registry.json")
    global_rows: list[dict] = []
    best_by = str(cfg.get("best-by", "val-loss"))
    metric, best_note = choose_best_metric(best_by, bool(cfg.get("dp", False)), bool(str(cfg.get("holdout-path", ""))))
    best = BestTracker(metric, patience=cfg.get("patience", 0))
    if best_note:
        log(WARNING, "equifed: %s", best_note)

    done = 0
    checkpoint = load_latest(out_dir) if bool(cfg.get("resume", False)) else None
    if checkpoint is not None:
        done = int(checkpoint["round"])
        model.load_state_dict(checkpoint["model"])
        strategy.load_state(checkpoint["strategy"])
        global_rows = list(checkpoint["history"]["global"])
        strategy.site_rows = list(checkpoint["history"]["sites"])
        saved = checkpoint["history"].get("best")
        if saved is not None and saved.get("metric") == metric:
            best = BestTracker.from_json(saved, patience=best.patience)
            if best.best_round is not None:
                restore_best_model(out_dir, best.best_round)
        elif saved is not None:  # the best by another metric says nothing about this one
            log(WARNING, "equifed: the run kept its best model by %s, this resume by %s: the best so far starts "
                "afresh", saved.get("metric"), metric)
            (out_dir / BEST_MODEL).unlink(missing_ok=True)
        log(INFO, "equifed: resuming %s after round %d of %d", out_dir, done, total_rounds)
    else:
        (out_dir / BEST_MODEL).unlink(missing_ok=True)  # an earlier run's, in the same folder
    strategy.round_offset = done
    last_arrays: list[ArrayRecord] = []  # the latest global model (final_model.pt when the run stops early)

    holdout = None
    if str(cfg.get("holdout-path", "")):
        data = load_site(Path(str(cfg["holdout-path"])), image_size=int(cfg["image-size"]),
                         num_classes=int(cfg["num-classes"]))
        holdout = make_loader(data.images, data.labels, batch_size=256)
    eval_model = build_model(str(cfg["model"]), int(cfg["num-classes"]))
    started = time.time()
    kinds = requested_kinds(cfg)

    analysis_failures: list[dict] = []

    def collect_statistics(current: int, arrays: ArrayRecord) -> dict:
        """Ask every site still in the run for its released statistics; analyse them."""
        nodes = [n for n in grid.get_node_ids() if n not in strategy.refused_nodes]
        replies = request_statistics(grid, arrays, request_config(cfg, current, kinds), nodes,
                                     timeout=float(cfg["round-timeout"]))
        strategy.expected_nodes[(current, "statistics")] = nodes
        replies = strategy._screen_privacy(current, replies, phase="statistics")
        strategy._record(current, "statistics", replies)
        failed = analyse(out_dir, current, to_releases(replies, kinds), cfg, kinds)
        if failed:  # recorded in the round's row and summary.json; training goes on
            analysis_failures.extend({"round": current, "analysis": k, "error": v} for k, v in failed.items())
            return {"analysis_failed": "; ".join(f"{k}: {v}" for k, v in failed.items())}
        return {}

    fair_counts: list[np.ndarray] = []  # the consortium's (A, stratum) counts: released once, summed over sites
    fair_on = float(cfg.get("fair-lambda", 0.0)) > 0

    def collect_fair(current: int, arrays: ArrayRecord) -> dict:
        """Consortium PSE of the new global model from the sites' noised cell counts and score sums; broadcast it
        with the density-ratio table in the next rounds' train config (fair-lambda > 0)."""
        nodes = [n for n in grid.get_node_ids() if n not in strategy.refused_nodes]
        request = ConfigRecord({"statistics": "fair-pse", "server-round": current, "seed": int(cfg["seed"]),
                                "fair-counts": not fair_counts,
                                **{k: v for k, v in cfg.items() if k.startswith("fair-")}})
        replies = request_statistics(grid, arrays, request, nodes, timeout=float(cfg["round-timeout"]))
        strategy.expected_nodes[(current, "fair-pse")] = nodes
        replies = strategy._screen_privacy(current, replies, phase="fair-pse")
        strategy._record(current, "fair-pse", replies)
        releases = to_releases(replies, ["fair-pse"])
        got = [r.records["fair-pse"] for r in releases if "fair-pse" in r.records]
        missing = [f"{r.site} ({r.status})" for r in releases if "fair-pse" not in r.records]
        if missing:  # e.g. a site's budget is exhausted: its share of the penalty is missing from now on
            log(WARNING, "equifed fairness penalty: round %d: no release from %s; see per_site.csv", current,
                ", ".join(missing))
        if not fair_counts:
            got = [g for g in got if "counts" in g]
            if not got:
                return {}
            fair_counts.append(np.sum([np.asarray(g["counts"]) for g in got], axis=0))
        if not got:
            return {}
        try:
            consortium = mitigation.consortium_strata(
                fair_counts, [np.sum([np.asarray(g["sums"]) for g in got], axis=0)],
                mitigation.parse_edges(cfg.get("fair-covariate-edges", "")), int(cfg.get("fair-mediator-levels", 2)),
                max_weight=float(cfg.get("fair-max-weight", 20.0)),
                pool_groups=bool(cfg.get("fair-pool-groups", True)),
                factorise_label=bool(cfg.get("fair-factorise-label", True)))
        except ValueError as err:  # e.g. the noised counts of one group are all suppressed: train unpenalised
            log(WARNING, "equifed fairness penalty: round %d: no broadcast (%s); raise the sites' pool "
                "(fair-pool-split) or lower release-noise", current, err)
            return {}
        pse = consortium.pse
        strategy.broadcast = consortium.to_config()
        return {"fair_pse": pse, "fair_sites": len(got)}

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Runs after every round (and once before round 1): evaluate, checkpoint, report."""
        current = server_round + done
        row: dict = {"round": current, "elapsed_s": round(time.time() - started, 2)}
        if holdout is not None:
            eval_model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate(eval_model, holdout)
            row.update({f"holdout_{k}": v for k, v in metrics.items()})
        if server_round == 0 and fair_on:
            row.update(collect_fair(current, arrays))  # sites penalise from the first round (and after a resume)
        if server_round == 0 and done > 0:
            return MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float))})
        if server_round > 0:
            train_ok = [r for r in strategy.site_rows if r["round"] == current and r["phase"] == "train"
                        and r["status"] == "ok"]
            exhausted = [r for r in strategy.site_rows if r["round"] == current and r["status"] == "budget exhausted"]
            if not train_ok and not exhausted:
                write_tables(out_dir, global_rows, strategy.site_rows)  # the sites' reasons reach per_site.csv
                raise RunFailed(f"round {current}: no site returned a model; see per_site.csv")
            row["sites_trained"] = len(train_ok)
            losses = [(r["train-loss"], r["num-examples"]) for r in train_ok if math.isfinite(r["train-loss"])]
            if losses:  # sites under DP withhold their training loss (NaN)
                row["train_loss"] = float(np.average([v for v, _ in losses], weights=[max(w, 1.0) for _, w in losses]))
            for key in ("val-loss", "val-auroc"):  # of the sites' models after this round's local training
                value = pooled(train_ok, key)
                if math.isfinite(value):
                    row[key.replace("-", "_")] = value
            if fair_on:
                row.update(collect_fair(current, arrays))
            if kinds:
                row.update(collect_statistics(current, arrays))
            state = arrays.to_torch_state_dict()
            last_arrays[:] = [arrays]
            if best.update(current, row.get(best.column)):
                save_model(out_dir / BEST_MODEL, state)  # before the checkpoint; a resume rewrites it from round_NNN
            if best.best_round is not None:
                row.update({"best_metric": best.metric, "best_round": best.best_round, "best_value": best.best_value})
            if best.should_stop and current < total_rounds:
                row["stopped"] = (f"no improvement in {best.metric} for {best.stale} round(s) (patience "
                                  f"{best.patience}); best: round {best.best_round}")
            save_checkpoint(out_dir, current, state, strategy.state(),
                            {"global": global_rows + [row], "sites": strategy.site_rows, "best": best.to_json()})
        global_rows.append(row)
        write_tables(out_dir, global_rows, strategy.site_rows)
        log(INFO, "equifed round %d/%d\n%s", current, total_rounds, round_table(current, strategy.site_rows, row))
        if row.get("stopped"):
            raise StopEarly(row["stopped"])
        return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, (int, float))
                             and not (isinstance(v, float) and math.isnan(v))})

    runner = strategy
    if bool(cfg.get("central-dp", False)):
        runner = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=float(cfg["central-dp-noise"]),
            clipping_norm=float(cfg["central-dp-clip"]),
            num_sampled_clients=int(cfg["min-train-nodes"]),
        )
    stopped = ""
    try:
        result = runner.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=max(total_rounds - done, 0),
            timeout=float(cfg["round-timeout"]),
            train_config=ConfigRecord({"local-epochs": int(cfg["local-epochs"])}),
            evaluate_fn=evaluate_round,
        )
        final = result.arrays.to_torch_state_dict() if result.arrays is not None else model.state_dict()
    except StopEarly as why:
        stopped = str(why)
        log(WARNING, "equifed: stopped early after round %d: %s", global_rows[-1]["round"], stopped)
        final = last_arrays[0].to_torch_state_dict()
    torch.save(final, out_dir / "final_model.pt")
    write_tables(out_dir, global_rows, strategy.site_rows)
    try:
        plot_learning_curve(out_dir, global_rows, strategy.site_rows)
    except Exception as err:  # a figure never fails a finished run
        log(WARNING, "equifed: the learning curve could not be drawn (%s: %s)", type(err).__name__, err)
        analysis_failures.append({"round": total_rounds, "analysis": "learning_curve",
                                  "error": f"{type(err).__name__}: {err}"})
    last = global_rows[-1] if global_rows else {}
    first = global_rows[0] if global_rows else {}
    if best.metric != "none" and best.best_round is None:
        best_note = f"no round had a {best.metric} value, so no best model is kept"
    best_row = next((r for r in global_rows if r["round"] == best.best_round), {})
    write_summary(out_dir, {
        "status": "completed",
        "rounds": int(last.get("round", done)),  # fewer than planned_rounds when the run stopped early
        "planned_rounds": total_rounds,
        "strategy": cfg["strategy"],
        "model": cfg["model"],
        "initial_holdout_auroc": first.get("holdout_auroc"),
        "final_holdout_auroc": last.get("holdout_auroc"),
        "best_by": best_by,
        "best_metric": None if best.best_round is None else best.metric,
        "best_round": best.best_round,
        "best_value": best.best_value,
        "best_model": BEST_MODEL if best.best_round is not None else None,
        "best_holdout_auroc": best_row.get("holdout_auroc"),
        "best_note": best_note or None,
        "patience": best.patience,
        "stopped_early": bool(stopped),
        "stopped_at_round": int(last["round"]) if stopped else None,
        "stopped_reason": stopped or None,
        "wall_time_s": round(time.time() - started, 1),
        "analysis_failures": analysis_failures,
        "run_config": cfg,
    })
