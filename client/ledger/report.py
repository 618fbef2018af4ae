"""What an ethics board reads from the ledger: per-dataset and site-wide spend, and every entry's epsilon."""

from __future__ import annotations

from client.ledger.accounting import epsilon_of, epsilon_trail, history_of
from client.ledger.storage import DEFAULT_DELTA, all_history, ledger_path, load_ledger_file, site_delta_of

RDP_NOTE = (
    "epsilon from training and from releases are each computed from their own sub-history; under RDP "
    "composition they do not add up to the total (the total is smaller than their sum)"
)


def dataset_summary(fp: str, ds: dict, delta: float) -> dict:
    train = history_of(ds["entries"], "train")
    release = history_of(ds["entries"], "release")
    return {
        "fingerprint": fp,
        "created": ds.get("created"),
        "delta": delta,
        "epsilon": epsilon_of(ds["history"], delta),
        "epsilon_train": epsilon_of(train, delta),
        "epsilon_release": epsilon_of(release, delta),
        "train_steps": sum(h[2] for h in train),
        "releases": sum(h[2] for h in release),
        "n_entries": len(ds["entries"]),
        "last_used": ds["entries"][-1]["time"] if ds["entries"] else None,
    }


def ledger_report(data_dir, delta: float | None = None) -> dict:
    """Everything an ethics board asks about the site's ledger, read-only (for the CLI).

    Raises FileNotFoundError when the site has no ledger, LedgerError when it is corrupted.
    `epsilon_after` of each entry is recomputed at `delta` (default: the site's delta, the one the ledger keeps and
    checks the budget at).
    """
    path = ledger_path(data_dir)
    doc = load_ledger_file(path)
    kept = site_delta_of(doc)
    datasets = []
    for fp, ds in doc["datasets"].items():
        d = float(delta if delta is not None else kept if kept is not None else ds.get("delta", DEFAULT_DELTA))
        summary = dataset_summary(fp, ds, d)
        trail = epsilon_trail(ds["entries"], d)
        summary["entries"] = [dict(e, epsilon_after=eps) for e, eps in zip(ds["entries"], trail)]
        datasets.append(summary)
    site_delta = float(delta if delta is not None else min((d["delta"] for d in datasets), default=DEFAULT_DELTA))
    return {"site": doc.get("site"), "path": str(path), "note": RDP_NOTE, "datasets": datasets,
            "delta": site_delta, "epsilon": epsilon_of(all_history(doc), site_delta)}
