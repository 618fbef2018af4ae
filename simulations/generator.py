"""Synthetic hospitals with a known causal model.

Per patient i of site ``name`` every random draw comes from ``np.random.SeedSequence([seed, crc32(name), i])``, split
into four children: structural variables (A, C, U_S, U_D, sex), anatomy, lesion and scanner noise. The three image
seeds are written to ``truth.csv``, so any patient can be rendered again, bit-identically, with S set to another value.

Rendering is two stages so a counterfactual is exact::

    base = render_base(row, size)            # depends on D and the anatomy/lesion seeds only
    x    = apply_scanner(base, s, knobs, noise_seed)   # contrast -> blur -> noise -> corner marker

Storage quantisation: ``x`` (float in [0, 1]) is stored as ``round(x * 4095)`` in a 12-bit DICOM (uint16, BitsStored
12, slope 1, intercept 0). ``to_uint12(render(row))`` equals the stored pixels exactly; ``stored / 4095`` recovers
``x`` to within 1/8190.

On disk, per site: ``images/<patient_id>.dcm``, ``manifest.csv`` (what the hospital has) and ``truth.csv`` (the hidden
structural truth, read only by simulations and tests), and ``boxes.csv`` (each drawn lesion's bounding box, as a
hospital's annotations would give it) when every positive patient's lesion is one the generator drew.

Boxes are in pixels of the written ``image_size`` x ``image_size`` image: pixel (row i, column j) covers
[j, j + 1) x [i, i + 1), ``x``/``y`` are the left/top edges (column/row), ``w``/``h`` the width/height.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import norm

from simulations.scenario import (
    GENERATOR_VERSION,
    HoldoutSpec,
    Scenario,
    SiteSpec,
    load_scenario,
    scenario_hash,
    scenario_to_toml,
)

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MAX_PIXEL = 4095  # 12 bits stored
MANIFEST_COLUMNS = ["patient_id", "image_path", "label", "site", "group", "age", "scanner_legacy", "sex"]
# The run config that names this generator's columns for the fairness penalty: a run on generated sites sets
# it explicitly (the app's defaults name no column).
FAIRNESS_RUN_CONFIG = {"fair-sensitive": "group", "fair-mediator": "scanner_legacy"}
SCANNER_KNOBS = [
    "legacy_noise_std", "legacy_contrast", "legacy_blur_sigma", "modern_noise_std", "modern_contrast",
    "modern_blur_sigma", "marker", "extra_noise_std", "contrast_scale", "brightness_offset",
]
HEADER_KNOBS = ["legacy_manufacturer", "legacy_model", "modern_manufacturer", "modern_model"]
_S_ALIASES = {"scanner_legacy": "S", "scanner_legacy_cf": "S_cf"}
BOX_COLUMNS = ["box_x", "box_y", "box_w", "box_h"]  # truth.csv; empty where no lesion is drawn
BOXES_FILE_COLUMNS = ["patient_id", "x", "y", "w", "h", "label"]
LESION_BOX_SIGMAS = 2.0  # a lesion's box is its centre +/- this many sigma (~91 % of the blob's mass)


# ----------------------------------------------------------------------------------------------------------- seeds

def patient_seed_sequence(seed: int, site_name: str, index: int) -> np.random.SeedSequence:
    """The root of all randomness for one patient: stable across runs, platforms and site order."""
    return np.random.SeedSequence([int(seed), zlib.crc32(site_name.encode()), int(index)])


def _seed_int(ss: np.random.SeedSequence) -> int:
    """A 63-bit integer seed (fits an int64 CSV column; default_rng(int) re-creates the stream)."""
    lo, hi = ss.generate_state(2, np.uint32)
    return int(((int(hi) << 32) | int(lo)) & ((1 << 63) - 1))


# ------------------------------------------------------------------------------------------- structural model

def _age_quadrature(site: SiteSpec, k: int = 400) -> np.ndarray:
    """Equal-probability quantiles of the age distribution (clipped, rounded normal) for exact expectations."""
    q = (np.arange(k) + 0.5) / k
    return np.round(np.clip(site.age_mean + site.age_std * norm.ppf(q), 18, 95))


def _disease_logit(site: SiteSpec, base_logit: float, a, c, s):
    return base_logit + site.beta_a * a + site.beta_c * (np.asarray(c, float) - 55.0) / 15.0 + site.beta_s * s


def causal_rates(site: SiteSpec) -> dict[str, float]:
    """The model's exact population quantities: base logit, P(S=1|A=a), P(D=1|A=a), P(D=1)."""
    ages = _age_quadrature(site)

    def p_d_given_a(b0: float, a: int) -> float:
        p_s = site.p_s_a1 if a else site.p_s_a0
        return float(np.mean(p_s * expit(_disease_logit(site, b0, a, ages, 1))
                             + (1 - p_s) * expit(_disease_logit(site, b0, a, ages, 0))))

    def prevalence(b0: float) -> float:
        return site.p_a * p_d_given_a(b0, 1) + (1 - site.p_a) * p_d_given_a(b0, 0)

    b0 = brentq(lambda b: prevalence(b) - site.target_prevalence, -30.0, 30.0, xtol=1e-12)
    return {
        "base_logit": b0,
        "p_s_a0": site.p_s_a0,
        "p_s_a1": site.p_s_a1,
        "p_d_a0": p_d_given_a(b0, 0),
        "p_d_a1": p_d_given_a(b0, 1),
        "prevalence": prevalence(b0),
    }


def site_columns(site: SiteSpec) -> dict[str, Any]:
    """The knobs a truth row carries so that it can be rendered without the scenario."""
    d = dataclasses.asdict(site)
    return {k: d[k] for k in ["lesion_contrast", *SCANNER_KNOBS, *HEADER_KNOBS]}


def _draw_structural(ss: np.random.SeedSequence) -> tuple[dict[str, float], list[np.random.SeedSequence]]:
    """Exogenous noise for one patient, drawn in a fixed order, plus the three image seed sequences."""
    s_struct, s_anat, s_lesion, s_noise = ss.spawn(4)
    rng = np.random.default_rng(s_struct)
    u = rng.random(5)
    z_age = rng.standard_normal()
    exo = {"u_source": u[0], "U_A": u[1], "U_S": u[2], "U_D": u[3], "u_sex": u[4], "z_age": z_age}
    return exo, [s_anat, s_lesion, s_noise]


def structural_rows(site: SiteSpec, exo: pd.DataFrame, b0: float, a: np.ndarray | None = None,
                     d: np.ndarray | None = None) -> pd.DataFrame:
    """Apply the structural equations of ``site`` to exogenous draws (vectorised).

    ``a``/``d`` given (semi-synthetic sites, where D is a real label and A is drawn given D) replace the model's
    equations for A/D; disease probabilities are then unknown (NaN).
    """
    if a is None:
        a = (exo["U_A"].to_numpy() < site.p_a).astype(int)
    c = np.round(np.clip(site.age_mean + site.age_std * exo["z_age"].to_numpy(), 18, 95)).astype(int)
    u_s = exo["U_S"].to_numpy()
    p_s = np.where(a == 1, site.p_s_a1, site.p_s_a0)
    s_a0 = (u_s < site.p_s_a0).astype(int)
    s_a1 = (u_s < site.p_s_a1).astype(int)
    s = np.where(a == 1, s_a1, s_a0)
    s_cf = np.where(a == 1, s_a0, s_a1)  # S under the other value of A, same U_S
    u_d = exo["U_D"].to_numpy()
    if d is None:
        p_d = expit(_disease_logit(site, b0, a, c, s))
        d = (u_d < p_d).astype(int)
        # D if only S were switched to S_cf (differs from D only when beta_s != 0: the recanting-witness case)
        d_s_cf = (u_d < expit(_disease_logit(site, b0, a, c, s_cf))).astype(int)
        p_d_a0 = expit(_disease_logit(site, b0, 0, c, s))  # P(D=1) with A set to 0, C and S as observed
        p_d_a1 = expit(_disease_logit(site, b0, 1, c, s))
    else:
        d = np.asarray(d, dtype=int)
        u_d = p_d = p_d_a0 = p_d_a1 = np.full(len(d), np.nan)
        d_s_cf, b0 = d, np.nan
    return pd.DataFrame({
        "A": a, "C": c, "S": s, "D": d, "U_S": u_s, "S_a0": s_a0, "S_a1": s_a1, "S_cf": s_cf,
        "U_D": u_d, "D_S_cf": d_s_cf,
        "p_S": p_s, "p_S_a0": site.p_s_a0, "p_S_a1": site.p_s_a1,
        "p_D": p_d, "p_D_a0": p_d_a0, "p_D_a1": p_d_a1,
        "base_logit": b0,
        "sex": np.where(exo["u_sex"].to_numpy() < 0.5, "F", "M"),
    })


def exogenous_draws(seed: int, name: str, n: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-patient exogenous noise (u_source, U_A, U_S, U_D, u_sex, z_age) and image seeds (n, 3) for patients 0..n-1."""
    rows, seeds = [], np.empty((n, 3), dtype=np.int64)
    for i in range(n):
        exo, children = _draw_structural(patient_seed_sequence(seed, name, i))
        rows.append(exo)
        seeds[i] = [_seed_int(c) for c in children]
    return pd.DataFrame(rows, columns=["u_source", "U_A", "U_S", "U_D", "u_sex", "z_age"]), seeds


def finish_truth(name: str, structural: pd.DataFrame, seeds: np.ndarray, image_size: int,
                  knobs: pd.DataFrame | dict[str, Any], source_site) -> pd.DataFrame:
    n = len(structural)
    ids = [f"{name}-{i:05d}" for i in range(n)]
    head = pd.DataFrame({"patient_id": ids, "index": np.arange(n), "site": name, "source_site": source_site})
    seed_cols = pd.DataFrame(seeds, columns=["seed_anatomy", "seed_lesion", "seed_noise"])
    knob_cols = knobs if isinstance(knobs, pd.DataFrame) else pd.DataFrame([knobs] * n)
    truth = pd.concat([head, structural.reset_index(drop=True), seed_cols, knob_cols.reset_index(drop=True)], axis=1)
    truth["image_size"] = image_size
    truth["base_npz"] = ""
    truth["base_split"] = ""
    truth["base_index"] = -1
    truth[BOX_COLUMNS] = truth_boxes(truth)
    return truth


def sample_truth(site: SiteSpec, seed: int, n: int | None = None, *, image_size: int = 64,
                 name: str | None = None) -> pd.DataFrame:
    """Sample the structural variables (and image seeds) of ``n`` patients without rendering any image.

    Row i is the same patient that ``generate_consortium`` writes as ``<name>-<i:05d>``.
    """
    name = name or site.name
    n = site.n if n is None else n
    b0 = causal_rates(site)["base_logit"]
    if site.label_prior >= 0:
        exo, seeds, structural = _label_prior_draws(site, seed, name, n, b0)
    else:
        exo, seeds = exogenous_draws(seed, name, n)
        structural = structural_rows(site, exo, b0)
    return finish_truth(name, structural, seeds, image_size, site_columns(site), site.name)


def _label_prior_draws(site: SiteSpec, seed: int, name: str, n: int, b0: float):
    """Pure label shift: the first round(n*q) diseased and n - round(n*q) healthy patients of the site's own stream.

    Keeping whole patients of the structural model, class by class, leaves P(A, C, S, X | D) untouched.
    """
    n1 = int(round(n * site.label_prior))
    need = {1: n1, 0: n - n1}
    pool = max(2 * n, 64)
    while True:
        exo, seeds = exogenous_draws(seed, name, pool)
        rows = structural_rows(site, exo, b0)
        d = rows["D"].to_numpy()
        if all((d == k).sum() >= m for k, m in need.items()):
            break
        pool *= 2
    keep = np.sort(np.concatenate([np.flatnonzero(d == k)[:m] for k, m in need.items()]))
    return exo.iloc[keep], seeds[keep], rows.iloc[keep].reset_index(drop=True)


def sample_holdout_truth(scenario: Scenario, n: int | None = None) -> pd.DataFrame:
    """Held-out patients: each from one named site's mechanism or from a site drawn with weight ∝ its n."""
    if scenario.holdout is None and n is None:
        raise ValueError(f"scenario {scenario.name!r} declares no [holdout]; pass n")
    spec = scenario.holdout or HoldoutSpec(n=n)
    n = spec.n if n is None else n
    exo, seeds = exogenous_draws(scenario.seed, spec.name, n)
    if spec.site is not None:
        src = np.full(n, scenario.sites.index(scenario.site(spec.site)))
    else:
        w = np.cumsum([s.n for s in scenario.sites], dtype=float)
        src = np.searchsorted(w / w[-1], exo["u_source"].to_numpy(), side="right")
    parts = []
    for j, site in enumerate(scenario.sites):
        idx = np.flatnonzero(src == j)
        if len(idx):
            rows = structural_rows(site, exo.iloc[idx], causal_rates(site)["base_logit"])
            rows.index = idx
            knobs = pd.DataFrame([site_columns(site)] * len(idx), index=idx)
            parts.append(pd.concat([rows, knobs], axis=1).assign(source_site=site.name))
    both = pd.concat(parts).sort_index()
    knob_names = ["lesion_contrast", *SCANNER_KNOBS, *HEADER_KNOBS]
    return finish_truth(spec.name, both.drop(columns=knob_names + ["source_site"]), seeds,
                         scenario.image_size, both[knob_names], both["source_site"].to_numpy())


# ----------------------------------------------------------------------------------------------------- rendering

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(ax, ax, indexing="ij")  # yy, xx in [-1, 1]


def _smooth_noise(rng: np.random.Generator, size: int, sigma_frac: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length sigma_frac * size."""
    f = gaussian_filter(rng.standard_normal((size, size)), sigma_frac * size, mode="wrap")
    return f / (f.std() + 1e-12)


def _soft_ellipse(yy, xx, cy, cx, ry, rx, edge: float) -> np.ndarray:
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return expit((1.0 - r) / edge)


def render_anatomy(seed_anatomy: int, size: int) -> np.ndarray:
    """A chest-radiograph-like background: soft body silhouette, two darker lung fields, mediastinum, smooth texture
    at the lesion's scale (so that a lesion is not found by looking for any bump)."""
    rng = np.random.default_rng(int(seed_anatomy))
    yy, xx = _grid(size)
    j = rng.uniform(-1, 1, size=8)
    body = _soft_ellipse(yy, xx, 0.05 + 0.04 * j[0], 0.03 * j[1], 0.95 + 0.04 * j[2], 0.80 + 0.06 * j[3], 0.06)
    lung_ry, lung_rx, lung_cy = 0.55 + 0.05 * j[4], 0.27 + 0.03 * j[5], -0.05 + 0.05 * j[6]
    lungs = (_soft_ellipse(yy, xx, lung_cy, -0.36, lung_ry, lung_rx, 0.08)
             + _soft_ellipse(yy, xx, lung_cy, 0.36 + 0.02 * j[7], lung_ry, lung_rx, 0.08))
    img = 0.08 + 0.55 * body - 0.25 * lungs * body
    texture = 0.045 * _smooth_noise(rng, size, 0.08) + 0.03 * _smooth_noise(rng, size, 0.04)
    # a few rib-like horizontal bands inside the lungs
    ribs = 0.04 * np.sin((yy * rng.uniform(5.5, 7.0) + rng.uniform(0, 2 * np.pi)) * np.pi) ** 8
    return img + (texture + ribs) * body


def lesion_params(seed_lesion: int) -> dict[str, float]:
    """Position (inside a lung field), size and relative amplitude of the lesion, from the patient's lesion seed."""
    rng = np.random.default_rng(int(seed_lesion))
    side = -0.36 if rng.random() < 0.5 else 0.36
    r, theta = np.sqrt(rng.random()) * 0.8, rng.uniform(0, 2 * np.pi)
    return {
        "cy": -0.05 + 0.5 * r * np.sin(theta),
        "cx": side + 0.24 * r * np.cos(theta),
        "sigma": rng.uniform(0.07, 0.15),  # in units of half the image width
        "amp": rng.uniform(0.6, 1.4),
    }


def lesion_box(seed_lesion: int, size: int) -> tuple[float, float, float, float]:
    """(x, y, w, h) of the lesion's box in pixels of a size x size image: centre +/- LESION_BOX_SIGMAS sigma,
    clipped to the image. x is the left edge (a column), y the top edge (a row); pixel j covers [j, j + 1).

    ``_grid`` puts pixel centre i at (i + 0.5) / size * 2 - 1, so a coordinate u in [-1, 1] lies at pixel
    position (u + 1) * size / 2; cy is along rows (yy), cx along columns (xx)."""
    p = lesion_params(seed_lesion)
    half, r = size / 2.0, LESION_BOX_SIGMAS * p["sigma"]

    def span(c: float) -> tuple[float, float]:
        lo, hi = (min(max((v + 1.0) * half, 0.0), float(size)) for v in (c - r, c + r))
        return float(lo), float(hi - lo)

    (x, w), (y, h) = span(p["cx"]), span(p["cy"])
    return x, y, w, h


def lesion_drawn(row: Mapping[str, Any]) -> bool:
    """Whether render_base draws a lesion for this row: D = 1, a generated (not a real) base and a non-zero contrast."""
    npz = row.get("base_npz", "") if hasattr(row, "get") else ""
    real_base = isinstance(npz, str) and bool(npz)
    return int(row["D"]) == 1 and not real_base and float(row["lesion_contrast"]) != 0.0


def truth_boxes(truth: pd.DataFrame) -> pd.DataFrame:
    """The truth.csv box columns (BOX_COLUMNS, pixels of each row's image_size): NaN where no lesion is drawn."""
    out = np.full((len(truth), 4), np.nan)
    for k, row in enumerate(truth.to_dict("records")):
        if lesion_drawn(row):
            out[k] = lesion_box(int(row["seed_lesion"]), int(row["image_size"]))
    return pd.DataFrame(out, columns=BOX_COLUMNS, index=truth.index)


def boxes_from_truth(truth: pd.DataFrame) -> pd.DataFrame:
    """boxes.csv rows: one per patient with a drawn lesion (label 1), in truth order."""
    boxes = truth_boxes(truth)
    keep = boxes["box_x"].notna().to_numpy()
    out = pd.DataFrame({"patient_id": truth["patient_id"].to_numpy()[keep]})
    for c in ("x", "y", "w", "h"):
        out[c] = boxes[f"box_{c}"].to_numpy()[keep]
    out["label"] = 1
    return out[BOXES_FILE_COLUMNS]


def render_base(row: Mapping[str, Any], size: int | None = None) -> np.ndarray:
    """Stage 1: the image before the scanner. Depends only on D and the anatomy/lesion seeds (or the real base image
    for semi-synthetic rows), never on A or S."""
    size = int(size or row["image_size"])
    npz = row.get("base_npz", "") if hasattr(row, "get") else ""
    if isinstance(npz, str) and npz:
        return load_npz_base(npz, str(row["base_split"]), int(row["base_index"]), size)
    img = render_anatomy(int(row["seed_anatomy"]), size)
    if int(row["D"]) == 1:
        p = lesion_params(int(row["seed_lesion"]))
        yy, xx = _grid(size)
        blob = np.exp(-((yy - p["cy"]) ** 2 + (xx - p["cx"]) ** 2) / (2 * p["sigma"] ** 2))
        img = img + float(row["lesion_contrast"]) * p["amp"] * blob
    return np.clip(img, 0.0, 1.0)


def marker_mask(size: int) -> np.ndarray:
    """Boolean mask of the corner marker (top-left square, ~10% of the width)."""
    k, m = max(2, size // 10), max(1, size // 32)
    mask = np.zeros((size, size), dtype=bool)
    mask[m:m + k, m:m + k] = True
    return mask


def _get(knobs: Any, key: str):
    return getattr(knobs, key) if hasattr(knobs, key) and not isinstance(knobs, Mapping) else knobs[key]


def apply_scanner(base: np.ndarray, s: int, knobs: Any, noise_seed: int) -> np.ndarray:
    """Stage 2: the acquisition (S -> X). Contrast about mid-grey, blur, additive noise, then the corner marker if S=1.

    ``knobs`` is a SiteSpec or a truth row. The noise field comes from ``noise_seed`` alone, so re-rendering with the
    other S changes only the scanner's parameters, not the noise realisation.
    """
    kind = "legacy" if int(s) == 1 else "modern"
    contrast = float(_get(knobs, f"{kind}_contrast")) * float(_get(knobs, "contrast_scale"))
    blur = float(_get(knobs, f"{kind}_blur_sigma"))
    noise = float(_get(knobs, f"{kind}_noise_std")) + float(_get(knobs, "extra_noise_std"))
    x = 0.5 + contrast * (base - 0.5) + float(_get(knobs, "brightness_offset"))
    if blur > 0:
        x = gaussian_filter(x, blur * base.shape[0] / 64.0, mode="nearest")  # blur in pixels at 64 px
    z = np.random.default_rng(int(noise_seed)).standard_normal(base.shape)
    x = x + noise * z
    if int(s) == 1 and _as_bool(_get(knobs, "marker")):
        x = np.where(marker_mask(base.shape[0]), 1.0, x)
    return np.clip(x, 0.0, 1.0)


def _as_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in {"true", "1", "yes"}
    return bool(v)


def render(row: Mapping[str, Any], size: int | None = None, s: int | None = None) -> np.ndarray:
    """Render one patient (float64 in [0, 1]); ``s=None`` uses the row's own S."""
    base = render_base(row, size)
    return apply_scanner(base, int(row["S"]) if s is None else int(s), row, int(row["seed_noise"]))


def to_uint12(x: np.ndarray) -> np.ndarray:
    """The storage quantisation: [0, 1] -> 0..4095."""
    return np.round(np.clip(x, 0.0, 1.0) * MAX_PIXEL).astype(np.uint16)


@functools.lru_cache(maxsize=4)
def _npz_split_cached(path: str, split: str, mtime_ns: int) -> np.ndarray:
    with np.load(path) as z:
        return z[f"{split}_images"]


def _npz_split(path: str, split: str) -> np.ndarray:
    return _npz_split_cached(path, split, Path(path).stat().st_mtime_ns)


def load_npz_base(path: str, split: str, index: int, size: int) -> np.ndarray:
    """A real image from a MedMNIST-format .npz as a [0, 1] grayscale base, resized (bilinear) to ``size``."""
    from PIL import Image

    img = np.asarray(_npz_split(str(path), split)[index])
    if img.ndim == 3:  # RGB MedMNIST sets: ITU-R 601 luma, as PIL's "L" conversion
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("L"))
    if img.shape != (size, size):
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((size, size), Image.BILINEAR))
    return img.astype(np.float64) / 255.0


# ------------------------------------------------------------------------------------------------------- writing

def _uid(*parts: Any) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def set_synthetic_patient(ds, row: Mapping[str, Any], s: int) -> None:
    """The study, patient and scanner header of a synthetic patient's DICOM (no real PHI: a SYNTHETIC^ name, no
    birth date; the scanner of the row's S), shared by the 2-D images and the volume series."""
    kind = "legacy" if int(s) == 1 else "modern"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber = 1
    ds.PatientName = f"SYNTHETIC^{row['patient_id']}"
    ds.PatientID = str(row["patient_id"])
    ds.PatientBirthDate = ""
    ds.PatientSex = str(row["sex"])
    ds.PatientAge = f"{int(row['C']):03d}Y"
    ds.InstitutionName = str(row["site"])
    ds.Manufacturer = str(row[f"{kind}_manufacturer"])
    ds.ManufacturerModelName = str(row[f"{kind}_model"])


def write_dicom(path: Path, pixels: np.ndarray, row: Mapping[str, Any], s: int, uid_key: str) -> None:
    """One DX-for-presentation DICOM. UIDs are derived from ``uid_key`` so regeneration is byte-identical."""
    sop_uid = _uid(uid_key, row["patient_id"], "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(uid_key, row["patient_id"], "study")
    ds.SeriesInstanceUID = _uid(uid_key, row["patient_id"], "series")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "DX"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    set_synthetic_patient(ds, row, s)
    ds.InstanceNumber = 1
    ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.save_as(path, enforce_file_format=True)


def manifest_from_truth(truth: pd.DataFrame, s_column: str = "S") -> pd.DataFrame:
    return pd.DataFrame({
        "patient_id": truth["patient_id"],
        "image_path": "images/" + truth["patient_id"] + ".dcm",
        "label": truth["D"].astype(int),
        "site": truth["site"],
        "group": truth["A"].astype(int),
        "age": truth["C"].astype(int),
        "scanner_legacy": truth[s_column].astype(int),
        "sex": truth["sex"],
    })[MANIFEST_COLUMNS]


def write_site(truth: pd.DataFrame, site_dir: str | Path, uid_key: str, s_values: np.ndarray | None = None) -> Path:
    """Render every row and write ``images/*.dcm``, ``manifest.csv``, ``truth.csv`` and ``boxes.csv``.

    ``s_values`` (default: the row's own S) is the scanner used for the image and its headers. The box columns are
    recomputed from the rows as written (a caller may have swapped in real base images after finish_truth).
    boxes.csv is written only when every positive patient has a drawn lesion: a semi-synthetic site's positives have
    none, and a file that left them out would tell a detector their images hold no lesion.
    """
    site_dir = Path(site_dir)
    truth = truth.assign(**truth_boxes(truth))
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    s_values = truth["S"].to_numpy() if s_values is None else np.asarray(s_values).astype(int)
    for row, s in zip(truth.to_dict("records"), s_values):
        px = to_uint12(render(row, s=int(s)))
        write_dicom(site_dir / "images" / f"{row['patient_id']}.dcm", px, row, int(s), uid_key)
    written = truth.assign(S_written=s_values)
    manifest_from_truth(written, "S_written").to_csv(site_dir / "manifest.csv", index=False)
    truth.to_csv(site_dir / "truth.csv", index=False)
    boxes_path = site_dir / "boxes.csv"
    if truth["box_x"].notna().sum() == (truth["D"].astype(int) == 1).sum():
        boxes_from_truth(truth).to_csv(boxes_path, index=False)
    else:
        boxes_path.unlink(missing_ok=True)  # left from an earlier write, it would describe other images
    return site_dir


def read_truth(site_dir: str | Path) -> pd.DataFrame:
    """truth.csv as written; the box columns as floats (NaN where empty), other empty cells stay ""."""
    truth = pd.read_csv(Path(site_dir) / "truth.csv", keep_default_na=False)
    for c in BOX_COLUMNS:
        if c in truth.columns:
            truth[c] = pd.to_numeric(truth[c], errors="coerce").astype(np.float64)
    return truth


def read_site_pixels(site_dir: str | Path) -> np.ndarray:
    """Stored pixels of a site, (N, H, W) uint16, in manifest order."""
    site_dir = Path(site_dir)
    manifest = pd.read_csv(site_dir / "manifest.csv")
    return np.stack([pydicom.dcmread(site_dir / p).pixel_array for p in manifest["image_path"]])


def _s_values(truth: pd.DataFrame, s_column: str | int | np.ndarray) -> np.ndarray:
    if isinstance(s_column, str):
        return truth[_S_ALIASES.get(s_column, s_column)].to_numpy().astype(int)
    return np.broadcast_to(np.asarray(s_column, dtype=int), (len(truth),))


def rerender_counterfactual(site_dir: str | Path, s_column: str | int | np.ndarray = "scanner_legacy_cf",
                            quantize: bool = True) -> np.ndarray:
    """Render every patient of a generated site again with S set to another value, all seeds unchanged.

    ``s_column``: a truth.csv column (``S_cf`` = S under the other A, the default; ``S_a0``/``S_a1`` = S under A=0/1;
    ``S`` = own value; the manifest names ``scanner_legacy``/``scanner_legacy_cf`` are accepted), or a 0/1 scalar or
    array. Returns (N, H, W) float64 in [0, 1], in manifest order. With ``quantize`` the values are on the 12-bit
    storage grid (k/4095), i.e. exactly what the site's DICOMs would hold divided by 4095.
    """
    truth = read_truth(site_dir)
    s_values = _s_values(truth, s_column)
    out = np.stack([render(row, s=int(s)) for row, s in zip(truth.to_dict("records"), s_values)])
    return to_uint12(out) / MAX_PIXEL if quantize else out


def write_counterfactual_site(site_dir: str | Path, out_dir: str | Path,
                              s_column: str | int | np.ndarray = "scanner_legacy_cf") -> Path:
    """A full site folder whose images (and scanner headers, manifest ``scanner_legacy``) use the counterfactual S:
    lets the real data pipeline score factual and counterfactual images identically. Labels and groups are unchanged."""
    truth = read_truth(site_dir)
    uid_key = f"counterfactual:{Path(site_dir).resolve()}:{s_column if isinstance(s_column, str) else 'custom'}"
    return write_site(truth, out_dir, uid_key, _s_values(truth, s_column))


# ---------------------------------------------------------------------------------------------------- consortium

def _site_uid_key(scenario: Scenario, name: str) -> str:
    return f"equifed:{scenario.seed}:{name}"


def generate_site(site: SiteSpec, scenario: Scenario, out_dir: str | Path) -> Path:
    truth = sample_truth(site, scenario.seed, image_size=scenario.image_size)
    return write_site(truth, Path(out_dir) / site.name, _site_uid_key(scenario, site.name))


def generate_consortium(scenario: Scenario | str | Path, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every client site (and the holdout) of a scenario under ``out_dir``; return the client site dirs in order.

    If ``out_dir/consortium.json`` records the same scenario hash and generator version, nothing is rewritten. If it
    records a different scenario, raise unless ``overwrite`` (which removes only the folders this module wrote).
    """
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    out_dir = Path(out_dir)
    info_path = out_dir / "consortium.json"
    digest = scenario_hash(scenario)
    site_dirs = [out_dir / s.name for s in scenario.sites]
    holdout_dir = out_dir / scenario.holdout.name if scenario.holdout else None

    owned: list[Path] = []
    if info_path.exists():
        info = json.loads(info_path.read_text())
        same = info.get("scenario_hash") == digest and info.get("generator_version") == GENERATOR_VERSION
        complete = all((d / "manifest.csv").exists() for d in site_dirs + ([holdout_dir] if holdout_dir else []))
        if same and complete:
            return site_dirs
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} already holds consortium {info.get('scenario')!r} generated from a different scenario "
                f"(hash {str(info.get('scenario_hash'))[:12]}…, version {info.get('generator_version')}; "
                f"this one: {scenario.name!r}, hash {digest[:12]}…, version {GENERATOR_VERSION}). "
                "Pass overwrite=True to replace it, or choose another output folder.")
        owned = [out_dir / d for d in info.get("site_dirs", [])]
        if info.get("holdout_dir"):
            owned.append(out_dir / info["holdout_dir"])
        info_path.unlink()
    targets = site_dirs + ([holdout_dir] if holdout_dir else [])
    clash = [d for d in targets if d.exists() and d not in owned]
    if clash and not overwrite:
        raise FileExistsError(f"{clash[0]} already exists and is not part of a consortium generated here; "
                              "pass overwrite=True or choose another output folder")
    for d in set(owned) | set(clash):
        if d.is_dir():
            shutil.rmtree(d)

    out_dir.mkdir(parents=True, exist_ok=True)
    for site in scenario.sites:
        generate_site(site, scenario, out_dir)
    if scenario.holdout:
        truth = sample_holdout_truth(scenario)
        write_site(truth, holdout_dir, _site_uid_key(scenario, scenario.holdout.name))
    (out_dir / "scenario.toml").write_text(scenario_to_toml(scenario))
    info = {  # written last: its presence marks a complete consortium
        "scenario": scenario.name,
        "scenario_hash": digest,
        "generator_version": GENERATOR_VERSION,
        "seed": scenario.seed,
        "image_size": scenario.image_size,
        "site_dirs": [s.name for s in scenario.sites],
        "sites": [{"name": s.name, "dir": s.name, "n": s.n} for s in scenario.sites],
        "holdout_dir": scenario.holdout.name if scenario.holdout else None,
        "paths_relative_to": "the folder holding this file",
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return site_dirs


def load_consortium(out_dir: str | Path) -> tuple[list[Path], Path | None]:
    """(client site dirs in order, holdout dir or None) of a generated consortium."""
    out_dir = Path(out_dir)
    info = json.loads((out_dir / "consortium.json").read_text())
    return [out_dir / d for d in info["site_dirs"]], (out_dir / info["holdout_dir"]) if info["holdout_dir"] else None
