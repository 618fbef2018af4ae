"""A site's optional ``boxes.csv``: where the lesions are, for localisation.

Columns ``patient_id, x, y, w, h`` (required) and ``label`` (optional, default 1; an empty cell is 1 too); any
number of boxes per patient, and patients with none. Coordinates are pixels of the image as its file holds it
(after EXIF orientation for JPEGs, before any resizing): pixel (row i, column j) covers [j, j + 1) x [i, i + 1),
``x``/``y`` are the left/top edges (column/row) and ``w``/``h`` the width/height, so a box over exactly columns
3..7 has x = 3, w = 5.

Unlike a manifest, whose bad rows are skipped, a boxes file is validated as a whole: a wrong box teaches a wrong
location, and a data manager fixes an export once, so every problem is listed in one ValueError.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from core_models.data.limits import ImageLimits, read_capped
from core_models.data.manifest import _label_missing, _parse_label

BOXES_FILE = "boxes.csv"
BOX_REQUIRED = ("patient_id", "x", "y", "w", "h")
BOX_COLUMNS = (*BOX_REQUIRED, "label")
_EDGE_TOLERANCE = 1e-6  # px: a box written as x, w with x + w == width may round past it by an ulp
_SHOWN = 10  # rows named per problem before "... and k more"

ImageSizes = Mapping[str, tuple[int, int]] | pd.DataFrame


def _rows(items: list[tuple[int, str]]) -> str:
    """'row 3', 'rows 3 ('abc'), 7 (empty)': the first _SHOWN, then how many more."""
    shown = [f"{r}" + (f" ({v})" if v else "") for r, v in items[:_SHOWN]]
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ("row " if len(items) == 1 else "rows ") + ", ".join(shown) + more


def _sizes(image_sizes: ImageSizes) -> dict[str, tuple[int, int]]:
    """patient_id -> (rows, cols), from a mapping or a frame with patient_id, rows, cols (SiteData.frame)."""
    if isinstance(image_sizes, pd.DataFrame):
        missing = [c for c in ("patient_id", "rows", "cols") if c not in image_sizes.columns]
        if missing:
            raise ValueError(f"image_sizes frame lacks column(s) {', '.join(missing)}")
        return {str(p).strip(): (int(r), int(c)) for p, r, c in
                zip(image_sizes["patient_id"], image_sizes["rows"], image_sizes["cols"])}
    return {str(p).strip(): (int(rc[0]), int(rc[1])) for p, rc in image_sizes.items()}


def load_boxes(path, patient_ids: Iterable[str] | None = None, image_sizes: ImageSizes | None = None,
               limits: ImageLimits | None = None) -> pd.DataFrame:
    """Read and validate a boxes file -> frame of ``patient_id`` (str), ``x, y, w, h`` (float64), ``label`` (int64),
    indexed by the 0-based data row of the file (header excluded), as read_manifest indexes manifest rows.

    Problems, all collected into one ValueError: missing required columns; empty or non-numeric (or infinite)
    coordinates; w or h <= 0; x or y < 0; a bad label; an empty patient_id; with `patient_ids` (the manifest's),
    patients not among them; with `image_sizes` (patient_id -> (rows, cols) of the image file, or a frame with
    patient_id, rows, cols such as SiteData.frame), boxes reaching past their image (patients without a known size
    are not checked). The file is read within limits.max_manifest_bytes.
    """
    path = Path(path)
    raw = read_capped(path, limits, "boxes file", ValueError)
    try:
        df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"boxes file {path} is empty (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"boxes file {path} is not a readable CSV: {e}") from e
    df = df.rename(columns={c: str(c).strip().lstrip("\ufeff").strip() for c in df.columns})

    problems: list[str] = []
    missing = [c for c in BOX_REQUIRED if c not in df.columns]
    if missing:
        problems.append(f"lacks required column(s) {', '.join(missing)} (has: {', '.join(df.columns) or 'none'})")

    n = len(df)
    coords = {}
    for c in ("x", "y", "w", "h"):
        if c not in df.columns:
            continue
        text = df[c].astype(str).str.strip()
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        bad = [(r, repr(t) if t else "empty") for r, t, v in zip(range(n), text, values) if not math.isfinite(v)]
        if bad:
            problems.append(f"{c} not a finite number in {_rows(bad)}")
        coords[c] = values
    for c in ("w", "h"):
        if c in coords:
            small = [(r, f"{v:g}") for r, v in enumerate(coords[c]) if math.isfinite(v) and v <= 0]
            if small:
                problems.append(f"{c} <= 0 in {_rows(small)}")
    for c in ("x", "y"):
        if c in coords:
            negative = [(r, f"{v:g}") for r, v in enumerate(coords[c]) if math.isfinite(v) and v < 0]
            if negative:
                problems.append(f"{c} < 0 in {_rows(negative)}")

    labels = np.ones(n, dtype=np.int64)
    if "label" in df.columns:
        bad = []
        for r, value in enumerate(df["label"]):
            if _label_missing(value):
                continue
            label, _ = _parse_label(value, None)
            if label is None:
                bad.append((r, repr(str(value).strip())))
            else:
                labels[r] = label
        if bad:
            problems.append(f"label not a non-negative integer in {_rows(bad)}")

    pids = df["patient_id"].astype(str).str.strip().to_numpy() if "patient_id" in df.columns else None
    if pids is not None:
        empty = [(r, "") for r, p in enumerate(pids) if p == ""]
        if empty:
            problems.append(f"patient_id missing in {_rows(empty)}")
        if patient_ids is not None:
            known = {str(p).strip() for p in patient_ids}
            unknown: dict[str, list[int]] = {}
            for r, p in enumerate(pids):
                if p and p not in known:
                    unknown.setdefault(p, []).append(r)
            if unknown:
                named = [f"{p!r} ({_rows([(r, '') for r in rs])})" for p, rs in list(unknown.items())[:_SHOWN]]
                more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
                problems.append(f"{len(unknown)} patient_id(s) not in the manifest: {', '.join(named)}{more}")
        if image_sizes is not None and len(coords) == 4:
            sizes = _sizes(image_sizes)
            outside = []
            for r, p in enumerate(pids):
                if p not in sizes:
                    continue
                rows, cols = sizes[p]
                x, y, w, h = (coords[c][r] for c in ("x", "y", "w", "h"))
                if not all(map(math.isfinite, (x, y, w, h))):
                    continue  # reported above
                over = [f"x + w = {x + w:g} > {cols} columns" if x + w > cols + _EDGE_TOLERANCE else "",
                        f"y + h = {y + h:g} > {rows} rows" if y + h > rows + _EDGE_TOLERANCE else ""]
                if any(over):
                    outside.append((r, f"{p!r}, {rows} x {cols} px: " + ", ".join(o for o in over if o)))
            if outside:
                problems.append(f"box outside its image in {_rows(outside)}")

    if problems:
        raise ValueError(f"boxes file {path}: {len(problems)} problem(s) (rows are 0-based data rows, header "
                         f"excluded): " + "; ".join(problems))
    return pd.DataFrame({"patient_id": pids, **{c: coords[c] for c in ("x", "y", "w", "h")}, "label": labels})


def rescale_boxes(boxes: pd.DataFrame, image_sizes: ImageSizes, size: int) -> pd.DataFrame:
    """Boxes in pixels of the size x size model input that load_site / read_image(path, size) make of each image.

    Those readers resize the whole image to size x size (pixels._resize: area averaging or antialiased bilinear with
    align_corners=False; no crop, no pad, aspect ratio not kept). Both map a pixel-edge coordinate u of a side of n
    pixels to u * size / n, so x and w scale by size / cols, y and h by size / rows. `image_sizes` are the images'
    own sizes (SiteData.frame's rows/cols); a patient without one is a ValueError naming it.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    sizes = _sizes(image_sizes)
    pids = boxes["patient_id"].astype(str).str.strip()
    unknown = sorted(set(pids) - set(sizes))
    if unknown:
        shown = ", ".join(repr(p) for p in unknown[:_SHOWN]) + (f" and {len(unknown) - _SHOWN} more"
                                                                if len(unknown) > _SHOWN else "")
        raise ValueError(f"no image size for {len(unknown)} patient(s) with boxes: {shown}")
    rows = np.array([sizes[p][0] for p in pids], dtype=np.float64)
    cols = np.array([sizes[p][1] for p in pids], dtype=np.float64)
    out = boxes.copy()
    for c, n in (("x", cols), ("w", cols), ("y", rows), ("h", rows)):
        out[c] = boxes[c].to_numpy(dtype=np.float64) * (size / n)
    return out


def boxes_by_patient(boxes: pd.DataFrame, patient_ids: Iterable[str]) -> list[np.ndarray]:
    """Per patient in `patient_ids` order (e.g. SiteData.frame's), its boxes as a (k, 4) float32 array of x, y, w, h
    (k = 0 for a patient without boxes): aligned with the image stack a detector trains on."""
    pids = boxes["patient_id"].astype(str).str.strip().to_numpy()
    xywh = boxes[["x", "y", "w", "h"]].to_numpy(dtype=np.float32)
    groups: dict[str, list[int]] = {}
    for k, p in enumerate(pids):
        groups.setdefault(p, []).append(k)
    return [xywh[groups.get(str(p).strip(), [])].reshape(-1, 4) for p in patient_ids]


def image_boxes(data_dir, frame: pd.DataFrame, size: int, limits: ImageLimits | None = None,
                manifest: str = "manifest.csv") -> tuple[list[np.ndarray], np.ndarray] | None:
    """For each image row of a loaded site (``frame``: SiteData.frame), its boxes in pixels of the ``size`` x
    ``size`` model input and whether the row is annotated; None when the site has no boxes file.

    The file names patients, so a patient with several images is not annotated (which image holds the box is
    unknown); a labelled-positive image without a box is not either (where its lesion is, is unknown). Annotated
    images with no box are lesion-free: every anchor is background."""
    path = Path(data_dir) / BOXES_FILE
    if not path.exists():
        return None
    pids = frame["patient_id"].astype(str).str.strip()
    # checked against the whole manifest: a boxed patient whose image was rejected (or who has no label) is not an
    # error in the boxes file; their boxes are simply not used
    listed = pd.read_csv(Path(data_dir) / manifest, dtype=str, keep_default_na=False, usecols=["patient_id"],
                         encoding="utf-8-sig")["patient_id"].str.strip()
    boxes = load_boxes(path, patient_ids=listed, image_sizes=frame, limits=limits)
    boxes = boxes[boxes["patient_id"].isin(set(pids))]
    per_image = boxes_by_patient(rescale_boxes(boxes, frame, size), pids)
    single = ~pids.duplicated(keep=False).to_numpy()
    positive = frame["label"].to_numpy().astype(np.int64) > 0
    has_box = np.array([len(b) > 0 for b in per_image])
    return per_image, single & (has_box | ~positive)
