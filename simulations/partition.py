"""`equifed-partition SOURCE --out OUT -k K [--alpha A] [--seed S]`: split a labelled image set into K hospital
folders that `equifed-simulate --sites OUT` trains on directly.

SOURCE is a MedMNIST-format `.npz` (keys {train,val,test}_{images,labels}, grey or colour images: a colour one, e.g.
RetinaMNIST, becomes RGB PNGs, trained with run config in-channels=3) or a folder with a manifest.csv (patient_id,
image_path, label [, split, any metadata]). The source's train and val rows are divided
among the sites (IID, or with Dirichlet(alpha) label skew: small alpha = each site sees mostly a few classes) and
keep their split in each site's manifest; its test rows become the global holdout, OUT/holdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from core_models.data import ManifestError, load_npz, read_manifest, write_rejected
from core_models.paths import resolve_site_file
from core_models.splits import assign_splits
from simulations.medmnist_sites import dirichlet_partition

HOLDOUT = "holdout"
RECORD = "partition.json"  # what this command wrote into OUT (an --overwrite removes exactly that)
SOURCE_REJECTED = "source_rejected.csv"
FRACTIONS = (0.7, 0.15, 0.15)  # train/val/test by patient when the source manifest has no split column


class PartitionError(ValueError):
    """Bad input: the message says what to fix."""


def load_npz_source(path: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """One row per image (patient_id, label, split, source_index) and each split's images (N, C, H, W) in [0, 1]:
    C = 1 for grey images, 3 when any split holds colour ones (a grey split then replicated to three channels)."""
    frames, images = [], {}
    if not zipfile.is_zipfile(path):
        raise PartitionError(f"{path}: not a .npz archive (a zip of .npy arrays, as MedMNIST ships)")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise PartitionError(f"{path}: not a readable .npz archive ({type(err).__name__}: {err})") from None
    wanted = [f"{s}_{kind}" for s in ("train", "val", "test") for kind in ("images", "labels")]
    missing = [k for k in wanted if k not in keys]
    if missing:
        raise PartitionError(f"{path}: missing array(s) {', '.join(missing)} (has: {', '.join(sorted(keys)) or 'none'});"
                             f" a MedMNIST-format archive holds {', '.join(wanted)}")
    for split in ("train", "val", "test"):
        try:
            x, y = load_npz(path, split, channels=None)  # as stored: grey (N, 1, H, W) or colour (N, 3, H, W)
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise PartitionError(str(err)) from None
        if len(y) and y.min() < 0:
            raise PartitionError(f"{path}: {split}_labels has negative labels ({int(y.min())})")
        images[split] = x
        frames.append(pd.DataFrame({"patient_id": [f"{split}-{i:06d}" for i in range(len(y))], "label": y,
                                    "split": split, "source_index": np.arange(len(y))}))
    if any(x.shape[1] == 3 for x in images.values()):
        images = {split: np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x for split, x in images.items()}
    return pd.concat(frames, ignore_index=True), images


def load_manifest_source(folder: Path, seed: int) -> tuple[pd.DataFrame, list, str | None]:
    """The manifest's usable rows with a `split` (the manifest's own, else drawn by patient), the rejected rows,
    and a note when the split was drawn here."""
    try:
        frame, rejected = read_manifest(folder / "manifest.csv", num_classes=None)
    except ManifestError as err:
        raise PartitionError(str(err)) from None
    frame = frame.assign(source_row=frame.index.to_numpy()).reset_index(drop=True)
    note = None
    if "split" in frame.columns:
        empty = int(frame["split"].isna().sum() + (frame["split"].astype(str).str.strip() == "").sum())
        if empty:
            raise PartitionError(f"{folder / 'manifest.csv'}: the split column is empty in {empty} row(s); fill "
                                 f"it (train, val or test) or drop the column to have the rows split by patient")
        frame["split"] = frame["split"].astype(str).str.strip()
    else:
        note = (f"no split column in {folder / 'manifest.csv'}: split by patient "
                f"({', '.join(f'{f:.0%} {s}' for f, s in zip(FRACTIONS, ('train', 'val', 'test')))}, "
                f"each patient's from its id and seed {seed}; a patient's images stay together)")
    try:
        frame["split"] = assign_splits(frame, FRACTIONS, seed=seed).to_numpy()
    except ValueError as err:  # unknown split names, or a patient in two splits (LeakageError)
        raise PartitionError(f"{folder / 'manifest.csv'}: {err}") from None
    return frame, rejected, note


def assign_sites(frame: pd.DataFrame, k: int, alpha: float | None, seed: int, min_per_site: int,
                 unit: str = "patient") -> pd.Series:
    """Site index (0..k-1) of every row, -1 for the holdout (test) rows. Patients are the unit: all of a patient's
    images go to one site; a patient's label for the skew is its highest label."""
    if k < 1:
        raise PartitionError(f"-k must be at least 1, got {k}")
    if alpha is not None and not alpha > 0:
        raise PartitionError(f"--alpha must be > 0 (small = strong label skew), got {alpha}")
    pid = frame["patient_id"].astype(str)
    patients = frame.groupby(pid).agg(label=("label", "max"), split=("split", "first"))
    pool = patients[patients["split"] != "test"]
    n_train = int((pool["split"] == "train").sum())
    if n_train < k:
        raise PartitionError(f"-k {k} is larger than the {n_train} training {unit}(s) in the source: every site "
                             f"needs training data")
    n_val = int((pool["split"] == "val").sum())
    if n_val == 0:
        raise PartitionError("the source has no validation rows (split val): every site needs some (its validation "
                             "score is computed every round)")
    if n_val < k:
        raise PartitionError(f"only {n_val} validation {unit}(s) for {k} sites: every site needs at least one "
                             f"(its validation score is computed every round); lower -k")
    try:
        parts = dirichlet_partition(pool["label"].to_numpy(), k, alpha, seed, min_per_site=min_per_site,
                                    groups=pool["split"].to_numpy())
    except (ValueError, RuntimeError) as err:
        raise PartitionError(str(err)) from None
    site_of = pd.Series(-1, index=patients.index)
    for j, idx in enumerate(parts):
        site_of.loc[pool.index[idx]] = j
    return pid.map(site_of).rename("site_index")


def _png(image: np.ndarray) -> Image.Image:
    """An (1, H, W) image in [0, 1] as PNG: 8-bit when it came from 8-bit data (exactly), else 16-bit. A (3, H, W)
    colour image as an 8-bit RGB PNG (Pillow writes no 16-bit colour; 8-bit data, as MedMNIST's, stays exact)."""
    if image.shape[0] == 3:
        return Image.fromarray(np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0))  # RGB
    x = image[0]
    eight = np.rint(x * 255.0)
    if np.abs(eight - x * 255.0).max() < 1e-3:
        return Image.fromarray(eight.astype(np.uint8))  # mode L
    return Image.fromarray(np.rint(x * 65535.0).astype(np.uint16))  # mode I;16


def _write_folder(folder: Path, rows: pd.DataFrame, name: str, npz_images: dict | None, source: Path) -> None:
    folder.mkdir(parents=True)
    rows = rows.copy()
    if npz_images is not None:
        (folder / "images").mkdir()
        paths = []
        for pid, split, index in zip(rows["patient_id"], rows["split"], rows["source_index"]):
            rel = f"images/{pid}.png"
            _png(npz_images[split][index]).save(folder / rel)
            paths.append(rel)
        rows["image_path"] = paths
    else:
        base = source.resolve()
        paths = []
        for row, text in zip(rows["source_row"], rows["image_path"]):
            target, _ = resolve_site_file(base, str(text))  # checked by read_manifest already
            rel = target.relative_to(base)
            dest = folder / rel
            if dest.exists():  # two manifest rows naming one file: a second copy under its row number
                rel = Path("images") / f"row{int(row):06d}_{rel.name}"
                dest = folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(target, dest)
            paths.append(rel.as_posix())
        rows["image_path"] = paths
    rows["site"] = name
    first = ["patient_id", "image_path", "label", "split", "site"]
    rows = rows[first + [c for c in rows.columns if c not in first and c != "site_index"]]
    rows.to_csv(folder / "manifest.csv", index=False)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """OUT must be empty, or hold an earlier partition that --overwrite may replace; nothing else is deleted."""
    if out.exists() and not out.is_dir():
        raise PartitionError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    record = out / RECORD
    if not overwrite:
        raise PartitionError(f"--out {out} is not empty; choose another folder"
                             + (" or pass --overwrite to replace the partition there" if record.exists() else ""))
    if not record.exists():
        raise PartitionError(f"--out {out} holds files equifed-partition did not write (no {RECORD}); "
                             f"--overwrite deletes only an earlier partition: choose another folder")
    try:
        folders = json.loads(record.read_text())["folders"]
    except (ValueError, KeyError, TypeError) as err:
        raise PartitionError(f"{record} is unreadable ({err}); remove the folder by hand") from None
    for name in folders:
        target = (out / name).resolve()
        if target.parent == out.resolve() and target.is_dir():
            shutil.rmtree(target)
    (out / SOURCE_REJECTED).unlink(missing_ok=True)
    record.unlink()


def _counts(rows: pd.DataFrame) -> dict:
    return {split: {str(k): int(v) for k, v in part["label"].value_counts().sort_index().items()}
            for split, part in rows.groupby("split")}


def partition(source: Path, out: Path, k: int, alpha: float | None = None, seed: int = 0, *,
              min_per_site: int = 10, overwrite: bool = False) -> dict:
    """Write OUT/site_1..site_K (and OUT/holdout when the source has test rows); return what partition.json holds.
    Every check runs before anything is written."""
    source = Path(source)
    if source.is_dir():
        if not (source / "manifest.csv").is_file():
            raise PartitionError(f"{source} has no manifest.csv")
        frame, rejected, note = load_manifest_source(source, seed)
        npz_images, kind = None, "manifest"
    elif source.is_file():
        frame, npz_images = load_npz_source(source)
        rejected, note, kind = [], None, "npz"
    else:
        raise PartitionError(f"{source} does not exist")
    site_index = assign_sites(frame, k, alpha, seed, min_per_site, unit="image" if kind == "npz" else "patient")
    frame = frame.assign(site_index=site_index.to_numpy())
    out = Path(out)
    _prepare_out(out, overwrite)
    if note:
        print(f"equifed-partition: {note}", flush=True)
    width = len(str(k))
    names = [f"site_{j + 1:0{width}d}" for j in range(k)]
    record = {"source": str(source.resolve()), "kind": kind, "k": k, "alpha": alpha, "seed": seed,
              "split_drawn_by_patient": note is not None, "folders": [], "sites": {}}
    if npz_images is not None:  # the channels the written PNGs hold (run config in-channels); unknown for a folder
        record["channels"] = int(next(iter(npz_images.values())).shape[1])
    for j, name in enumerate(names):
        rows = frame[frame["site_index"] == j]
        _write_folder(out / name, rows, name, npz_images, source)
        record["folders"].append(name)
        record["sites"][name] = _counts(rows)
    test = frame[frame["site_index"] == -1]
    if len(test):
        _write_folder(out / HOLDOUT, test, HOLDOUT, npz_images, source)
        record["folders"].append(HOLDOUT)
        record["holdout"] = _counts(test)
    if rejected:
        write_rejected(rejected, out / SOURCE_REJECTED)
    record["rejected_source_rows"] = len(rejected)
    record["num_classes"] = int(frame["label"].max()) + 1
    (out / RECORD).write_text(json.dumps(record, indent=2))
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="equifed-partition", description=__doc__.split("\n\n")[0],
                                     epilog="Then: equifed-simulate --sites OUT --out runs/NAME "
                                            "(OUT/holdout is used as the holdout)")
    parser.add_argument("source", help="MedMNIST-format .npz, or a folder with manifest.csv")
    parser.add_argument("--out", required=True, help="folder for the site folders (must be empty or new)")
    parser.add_argument("-k", "--num-sites", type=int, required=True, help="number of sites")
    parser.add_argument("--alpha", type=float, default=None,
                        help="Dirichlet concentration of each class over the sites (label skew; 0.1 strong, 10 mild);"
                             " default: an IID split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the partition (and of a drawn split)")
    parser.add_argument("--min-per-site", type=int, default=10,
                        help="a Dirichlet draw is redrawn until every site holds this many patients (default 10)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier equifed-partition in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = partition(Path(args.source), Path(args.out), args.num_sites, args.alpha, args.seed,
                           min_per_site=args.min_per_site, overwrite=args.overwrite)
    except PartitionError as err:
        print(f"equifed-partition: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    how = "IID" if args.alpha is None else f"Dirichlet(alpha={args.alpha}) label skew"
    print(f"equifed-partition: {args.source} -> {len(record['sites'])} sites in {out} ({how}, seed {args.seed})")
    for name, counts in {**record["sites"], **({HOLDOUT: record["holdout"]} if "holdout" in record else {})}.items():
        parts = "; ".join(f"{split} {sum(c.values())} (labels " + ", ".join(f"{k}: {v}" for k, v in c.items()) + ")"
                          for split, c in counts.items())
        print(f"  {name:<10} {parts}")
    if "holdout" not in record:
        print("equifed-partition: the source has no test rows: no holdout folder (the run scores no global holdout)")
    if record["rejected_source_rows"]:
        print(f"equifed-partition: {record['rejected_source_rows']} source row(s) skipped; reasons in "
              f"{out / SOURCE_REJECTED}")
    extra = f" -c num-classes={record['num_classes']}" if record["num_classes"] > 2 else ""
    if record.get("channels") == 3:
        print("equifed-partition: colour images: the sites hold RGB PNGs; train them in colour with -c in-channels=3")
        extra += " -c in-channels=3"
    print(f"next: equifed-simulate --sites {out} --out runs/NAME{extra} [-c image-size=N]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
