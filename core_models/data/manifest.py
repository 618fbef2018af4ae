"""The site manifest: ``manifest.csv`` read within its size cap, its columns, labels and image paths validated.

One bad row must never stop a site: it becomes a :class:`Rejection` with a reason a data manager can act on
(:func:`write_rejected`). Whole-site problems (missing manifest, missing columns, nothing usable) raise
:class:`ManifestError`. Every image path goes through :func:`core_models.paths.resolve_site_file`, so nothing
outside the site folder is ever opened.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core_models.data.limits import ImageError, ImageLimits, ManifestError, read_capped
from core_models.paths import UnsafePath, resolve_site_file

MANIFEST_REQUIRED = ("patient_id", "image_path", "label")
# Manifest columns read as text so identifiers such as "007" or site "01" keep their leading zeros.
_TEXT_COLUMNS = ("patient_id", "image_path", "label", "site", "split")


@dataclass
class Rejection:
    image_path: str
    row: int | None  # 0-based manifest data row; None when not from a row
    reason: str


def _read_manifest_bytes(manifest_path: Path, limits: ImageLimits | None = None) -> bytes:
    """The manifest's bytes within limits.max_manifest_bytes (see :func:`read_capped`)."""
    return read_capped(manifest_path, limits, "manifest", ManifestError)


# The label _parse_manifest(unlabelled=True) gives a row whose label cell is empty (real labels are >= 0).
_NO_LABEL = -1


def _label_missing(value) -> bool:
    """An empty label cell: None, NaN (pandas' reading of an empty cell) or only whitespace."""
    return value is None or (not isinstance(value, str) and pd.isna(value)) or str(value).strip() == ""


def _parse_label(value, num_classes: int | None) -> tuple[int | None, str]:
    """Return (label, "") or (None, reason). Accepts "1" and "1.0" (spreadsheets write those), nothing fractional."""
    if _label_missing(value):
        return None, "missing label"
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        return None, f"bad label {text!r}: not an integer"
    label = int(number)
    if label < 0 or (num_classes is not None and label >= num_classes):
        upper = "" if num_classes is None else f", {num_classes}"
        return None, f"bad label {text!r}: out of range [0{upper})"
    return label, ""


def _normal_text(value) -> str:
    """A text cell as every reader sees it: surrounding whitespace removed (a missing cell is "")."""
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value).strip()


def _table(raw: bytes, manifest_path: Path) -> pd.DataFrame:
    """The manifest's rows, normalised once for every reader (the loader, the splits, the dataset fingerprint, the
    patient count behind the site's delta): header names without surrounding whitespace or a byte-order mark, the
    text columns read as text, and `patient_id` and `image_path` stripped of surrounding whitespace, so that
    " alpha-1" and "alpha-1" are one patient everywhere. Raises ManifestError when a required column is missing."""
    try:
        header = pd.read_csv(io.BytesIO(raw), nrows=0, encoding="utf-8-sig").columns
    except pd.errors.EmptyDataError:
        raise ManifestError(f"manifest {manifest_path} is empty (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {manifest_path} is not a readable CSV: {e}") from e
    names = {str(c): str(c).strip().lstrip("\ufeff").strip() for c in header}
    missing = [c for c in MANIFEST_REQUIRED if c not in names.values()]
    if missing:
        raise ManifestError(
            f"manifest {manifest_path} lacks required column(s) {', '.join(missing)} "
            f"(has: {', '.join(names.values()) or 'none'})"
        )
    try:
        df = pd.read_csv(
            io.BytesIO(raw),
            encoding="utf-8-sig",
            dtype={raw_name: str for raw_name, name in names.items() if name in _TEXT_COLUMNS},
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {manifest_path} is not a readable CSV: {e}") from e
    df = df.rename(columns=names)
    for column in ("patient_id", "image_path"):
        df[column] = [_normal_text(v) for v in df[column]]
    return df


def manifest_table(manifest_path, limits: ImageLimits | None = None) -> pd.DataFrame:
    """Every row of a manifest, labelled or not and before any row is validated, normalised as the loader reads it."""
    manifest_path = Path(manifest_path)
    return _table(_read_manifest_bytes(manifest_path, limits), manifest_path)


def manifest_patients(manifest_path, limits: ImageLimits | None = None) -> int:
    """How many patients the manifest names, over every row (labelled or not, usable or not): what the site's
    default delta is sized for, so that no run setting (the number of classes, the image size) can change it."""
    ids = manifest_table(manifest_path, limits)["patient_id"]
    return int(ids[ids != ""].nunique())


def _locate_file(site: str, target: str) -> tuple[str, tuple[int, int]]:
    """An image file's resolved path and its (size, mtime_ns)."""
    resolved, st = resolve_site_file(site, target)
    return str(resolved), (st.st_size, st.st_mtime_ns)


def _parse_manifest(raw: bytes, manifest_path: Path, num_classes: int | None, site_dir: Path | None = None,
                    unlabelled: bool = False, locate=_locate_file):
    """Parse manifest bytes -> (accepted rows indexed by manifest row, resolved paths, their (size, mtime_ns),
    rejections, number of rows). Files are stat-ed here, before decoding, so a file changed meanwhile invalidates.

    With `unlabelled`, a row whose label cell is empty is accepted (every other check still applies) with label
    :data:`_NO_LABEL` instead of being rejected as "missing label"; a bad non-empty label is still rejected.

    Image paths are relative to the manifest's folder and must resolve (symlinks followed) to regular files inside
    `site_dir` (default: the manifest's folder); anything else is a Rejection with the reason from
    :func:`core_models.paths.resolve_site_file`, and nothing of it is opened. `locate(site, target)` gives a row's
    (resolved path, stamp) or raises the row's reason: an image file by default; a volume site passes the listing of
    a series folder or NIfTI file (core_models.data.volumes.volume_files) as the stamp."""
    df = _table(raw, manifest_path)
    n_rows = len(df)

    base = os.path.abspath(manifest_path.parent)
    site = os.path.abspath(site_dir) if site_dir is not None else base
    same = os.path.realpath(site) == os.path.realpath(base)
    keep, labels, paths, stamps, rejected = [], [], [], [], []
    for row, pid, ipath, lab in zip(range(n_rows), df["patient_id"], df["image_path"], df["label"]):
        shown = ipath
        if shown == "":
            rejected.append(Rejection(shown, row, "missing image_path"))
            continue
        if pid == "":
            rejected.append(Rejection(shown, row, "missing patient_id"))
            continue
        label, why = (_NO_LABEL, "") if unlabelled and _label_missing(lab) else _parse_label(lab, num_classes)
        if label is None:
            rejected.append(Rejection(shown, row, why))
            continue
        text = shown.strip()
        try:  # relative to the manifest; an absolute image_path stays as it is (and must still be in the site)
            resolved, stamp = locate(site, text if same else os.path.join(base, text))
        except (UnsafePath, ImageError) as e:
            rejected.append(Rejection(shown, row, str(e)))
            continue
        except (OSError, ValueError) as e:  # e.g. an over-long name: still this row's problem only
            rejected.append(Rejection(shown, row, f"unusable image path ({type(e).__name__}: {e})"))
            continue
        keep.append(row)
        labels.append(label)
        paths.append(resolved)
        stamps.append(stamp)
    df = df.iloc[keep].copy()
    df["label"] = np.asarray(labels, dtype=np.int64)
    return df, paths, stamps, rejected, n_rows


def _first_reasons(rejected: list[Rejection], k: int = 3) -> str:
    return "; ".join(f"row {r.row} ({r.image_path}): {r.reason}" for r in rejected[:k])


def read_manifest(manifest_path, num_classes: int | None = 2,
                  limits: ImageLimits | None = None) -> tuple[pd.DataFrame, list[Rejection]]:
    """Read and validate a manifest; bad rows (label, missing file, path outside the manifest's folder, not a
    regular file) become Rejections, not errors.

    The returned frame keeps the 0-based manifest row number as its index (so rows can be traced back), all original
    columns, and ``label`` as int64. ``image_path`` stays as written; relative paths are relative to the manifest.
    """
    manifest_path = Path(manifest_path)
    raw = _read_manifest_bytes(manifest_path, limits)
    df, _, _, rejected, n_rows = _parse_manifest(raw, manifest_path, num_classes)
    if df.empty:
        detail = "no rows" if n_rows == 0 else f"{n_rows} rows, all rejected; first reasons: {_first_reasons(rejected)}"
        raise ManifestError(f"no usable rows in {manifest_path}: {detail}")
    return df, rejected


def write_rejected(rejections: list[Rejection], path) -> None:
    """Write rejections as CSV (image_path,row,reason), header even when empty, for the site's data manager."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "row", "reason"])
        for r in rejections:
            w.writerow([r.image_path, "" if r.row is None else r.row, r.reason])
