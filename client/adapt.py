"""New-site prior adaptation: a hospital with unlabelled scans and the global model estimates its own
label prior and corrects the model's probabilities for it.

Nothing leaves the site: its images are scored locally, and the only outside input is the consortium's released
(noised) statistics that the server writes to `shift_consortium.json` (server/shift.py): the per-label histograms
of the model's log-odds on the sites' holdouts, their confusion counts and their label counts.

* prior: MLLS on the fixed log-odds bins (EM; the consortium's per-label histograms act as the calibration), with a
  95% parametric-bootstrap interval; BBSE from the confusion counts as a cross-check.
* correction (Saerens et al. 2002): p'(y | x) is proportional to p(y | x) * prior_new(y) / prior_train(y), where
  prior_train is the consortium's label mix, the prior the global model learnt. It assumes the model's
  probabilities are calibrated at that prior; a CNN trained to near-separation is overconfident, and then the
  correction gains little or loses (see tests/test_shift.py and benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client.policy import SitePolicy
from client.shift_stats import model_outputs
from client.site import STATE_DIR
from core_models.data import load_site
from core_models.model_factory import ModelSpec
from core_models.model_card import load_state_dict_file
from core_models.protocol import CONFUSION, LABEL_COUNTS, NUM_CLASSES, OUTPUT_HIST
from core_models.label_shift import N_BINS, bbse_prior, mlls_interval, output_bins


def load_model_weights(path: str | Path) -> dict:
    """A state dict from `final_model.pt` or a round checkpoint (which holds it under "model"), read with
    ``torch.load(weights_only=True)``: a file that would need to run code to load, or holds no state dict, raises
    ValueError naming the file (core_models.model_card.load_state_dict_file)."""
    return load_state_dict_file(path)


def prior_correct(probs: np.ndarray, new_prior: np.ndarray, train_prior: np.ndarray) -> np.ndarray:
    """Bayes' rule with the label prior swapped: p(y|x) * new(y) / train(y), renormalised."""
    w = np.asarray(new_prior, float) / np.maximum(np.asarray(train_prior, float), 1e-12)
    out = np.asarray(probs, float) * w
    return out / out.sum(1, keepdims=True)


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Log-loss and Brier score (sum over classes) of probabilities against labels."""
    p = np.clip(probs, 1e-7, 1.0)
    onehot = np.eye(probs.shape[1])[labels]
    return {"log_loss": float(-np.mean(np.log(p[np.arange(len(labels)), labels]))),
            "brier": float(np.mean(((probs - onehot) ** 2).sum(1)))}


def estimate_prior(logits: np.ndarray, consortium: dict, rng: np.random.Generator) -> dict:
    """The site's label prior from its (local, unnoised) output bins and the consortium's released statistics."""
    if list(consortium["logodds_edges"]) != list(np.arange(-8.0, 8.5, 1.0)):
        raise ValueError("the consortium statistics use other log-odds bins than this client")
    bins = output_bins(logits)
    target = np.stack([np.bincount(bins[:, o], minlength=N_BINS) for o in range(bins.shape[1])]).astype(float)
    cond = np.asarray(consortium[OUTPUT_HIST], float)
    prior, lo, hi = mlls_interval(target, 0.0, cond, float(consortium["output_hist_sigma"]), rng)
    k = cond.shape[0]
    bbse = bbse_prior(np.bincount(logits.argmax(1), minlength=k), np.asarray(consortium[CONFUSION], float))
    return {"prior": prior, "lo": lo, "hi": hi, "bbse": bbse}


BOUNDARY = 0.01  # an estimated class share this close to 0 or 1 is the EM stuck at the edge, not a measurement
WIDE = 0.5  # a 95% interval wider than this says nothing about the prior


def guard(est: dict, before: dict | None, after: dict | None) -> list[str]:
    """Why the correction should not be applied: an estimate on the boundary, an uninformative interval, or (when
    the site has labels) its own before/after showing harm. Empty when the correction may be used."""
    reasons = []
    prior, lo, hi = (np.asarray(est[k], float) for k in ("prior", "lo", "hi"))
    if np.any(prior < BOUNDARY) or np.any(prior > 1 - BOUNDARY):
        reasons.append(f"the estimated prior {np.round(prior, 3).tolist()} sits on the boundary (a weak or "
                       f"miscalibrated model piles its outputs into few bins)")
    if np.max(hi - lo) > WIDE:
        reasons.append(f"its 95% interval is wider than {WIDE} ({np.round(lo, 3).tolist()} to "
                       f"{np.round(hi, 3).tolist()}): uninformative")
    if before is not None and after is not None and (after["log_loss"] > before["log_loss"]
                                                     or after["brier"] > before["brier"]):
        reasons.append(f"on this site's own labels it makes predictions worse (log-loss {before['log_loss']:.4f} "
                       f"-> {after['log_loss']:.4f}, Brier {before['brier']:.4f} -> {after['brier']:.4f})")
    return reasons


def _load_images(data: Path, image_size: int, num_classes: int, channels: int = 1):
    """The site's images (`channels` 1 grey, 3 RGB); a manifest without (complete) labels is read through a copy with
    placeholder labels, written as `.equifed/adapt_manifest.csv` in the site folder (the site's own state folder,
    beside its ledger)."""
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    labelled = "label" in manifest.columns and (manifest["label"].str.strip() != "").all()
    if labelled:
        site = load_site(data, image_size=image_size, num_classes=num_classes, channels=channels)
        return site.images, site.frame, site.labels
    copy = manifest.assign(label="0")
    copy["image_path"] = [p if Path(p).is_absolute() else str(Path("..") / p) for p in copy["image_path"]]
    (data / STATE_DIR).mkdir(exist_ok=True)
    copy.to_csv(data / STATE_DIR / "adapt_manifest.csv", index=False)
    site = load_site(data, image_size=image_size, num_classes=num_classes, manifest=f"{STATE_DIR}/adapt_manifest.csv",
                     channels=channels)
    return site.images, site.frame, None


def _checked_sizes(consortium: dict, image_size: int | None, policy: SitePolicy) -> tuple[int, int]:
    """(classes, image size) from the consortium's file (it comes from outside the site), within the site's
    ceilings (max-stats-dim, max-image-size) and checked before anything is allocated."""
    k, size = consortium.get(NUM_CLASSES), image_size or consortium.get("image_size")
    for name, value, ceiling in ((NUM_CLASSES, k, policy.ceilings["max-stats-dim"]),
                                 ("image_size", size, policy.ceilings["max-image-size"])):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
            raise ValueError(f"the consortium file's {name} must be an integer in [1, {ceiling}] (the site's "
                             f"ceiling), got {value!r}")
    if k < 2:
        raise ValueError(f"the consortium file's num_classes must be at least 2, got {k}")
    return k, size


def adapt_site(data: str | Path, model_path: str | Path, consortium_path: str | Path, out_dir: str | Path,
               image_size: int | None = None, seed: int = 0) -> dict:
    """Estimate the site's prior, correct the global model's probabilities, write
    `adapted_predictions.csv` and `prior.json` to `out_dir`; return the summary."""
    torch.set_num_threads(1)
    data, out_dir = Path(data), Path(out_dir)
    consortium = json.loads(Path(consortium_path).read_text())
    k, size = _checked_sizes(consortium, image_size, SitePolicy.load(data))
    channels = consortium.get("in_channels", 1)  # a file from outside the site: 1 or 3 only
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"the consortium file's in_channels must be 1 or 3, got {channels!r}")
    model = ModelSpec(model=str(consortium["model"]), num_classes=k, in_channels=channels).network()
    model.load_state_dict(load_model_weights(model_path))
    images, frame, labels = _load_images(data, size, k, channels)
    logits, _ = model_outputs(model, images)
    probs = torch.softmax(torch.as_tensor(logits), 1).numpy()
    est = estimate_prior(logits, consortium, np.random.default_rng(seed))
    train_prior = np.clip(np.asarray(consortium[LABEL_COUNTS], float), 0.0, None)
    train_prior = train_prior / train_prior.sum()
    adapted = prior_correct(probs, est["prior"], train_prior)
    before = scores(probs, labels) if labels is not None else None
    after = scores(adapted, labels) if labels is not None else None
    warnings = guard(est, before, after)
    if warnings:  # the unadapted probabilities are the safer output then
        adapted = probs

    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"patient_id": frame["patient_id"], "image_path": frame["image_path"]})
    for y in range(k):
        table[f"p_model_{y}"] = probs[:, y]
        table[f"p_adapted_{y}"] = adapted[:, y]
    if labels is not None:
        table["label"] = labels
    table.to_csv(out_dir / "adapted_predictions.csv", index=False)
    summary = {
        "n_images": int(len(probs)),
        "estimated_prior": est["prior"].tolist(),
        "interval_95": [est["lo"].tolist(), est["hi"].tolist()],
        "bbse_prior": est["bbse"].tolist(),
        "train_prior": train_prior.tolist(),
        "method": "MLLS on fixed log-odds bins against the consortium's released per-label histograms",
        "consortium_round": consortium.get("round"),
        "consortium_sites": consortium.get("sites"),
        "applied": not warnings,  # False: p_adapted_* are the model's own probabilities
        "warnings": warnings,
    }
    if labels is not None:  # a site that does have labels can see what the correction bought
        summary["labelled_prior"] = (np.bincount(labels, minlength=k) / len(labels)).tolist()
        summary["before"] = before
        summary["after"] = after  # of the correction as estimated, applied or not
    (out_dir / "prior.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(args) -> int:
    """`equifed-client adapt`: print the estimated prior and where the predictions went. Exit 2 with the reason on
    a model file that is refused or missing."""
    try:
        load_model_weights(args.model)  # refused before any of the site's images is read
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = adapt_site(args.data, args.model, args.consortium_stats, args.out, args.image_size, args.seed)
    lo, hi = summary["interval_95"]
    print(f"{summary['n_images']} images; estimated label prior (MLLS): "
          + ", ".join(f"{p:.3f} [{a:.3f}, {b:.3f}]" for p, a, b in zip(summary["estimated_prior"], lo, hi))
          + f"; consortium (training) prior: {', '.join(f'{p:.3f}' for p in summary['train_prior'])}")
    if "before" in summary:
        b, a = summary["before"], summary["after"]
        print(f"with labels: log-loss {b['log_loss']:.4f} -> {a['log_loss']:.4f}, "
              f"Brier {b['brier']:.4f} -> {a['brier']:.4f}")
    for reason in summary["warnings"]:
        print(f"warning: {reason}", file=sys.stderr)
    if summary["warnings"]:
        print("warning: the correction was NOT applied: adapted_predictions.csv keeps the model's own probabilities",
              file=sys.stderr)
    print(f"wrote {Path(args.out) / 'adapted_predictions.csv'} and {Path(args.out) / 'prior.json'}")
    return 0
