"""Synthetic CT studies of the 2D generator's patients: the same causal draw, rendered as volumes.

Patients come from :func:`simulations.generator.sample_truth` (row i is the same patient the 2D consortium writes as
``<site>-<i:05d>``: same A, C, S, D and image seeds), so labels, groups and scanners match the 2D scenario of the same
seed. Only the rendering is new. Geometry is physical: the study is ``side`` slices of ``side`` x ``side`` pixels,
in-plane spacing ``fov_mm / side``, slices contiguous (spacing = thickness) with the thickness set by the scanner
(S = 1: legacy, thick slices). The anatomy is defined in millimetres, so a thick-slice study covers more of the torso
and averages each slice over its thickness (blur along z): resampled to millimetres, the two scanners show the same
body, the legacy one blurrier along z. Each slice is the mean of ``subslices`` thin samples across its thickness.

Rendering is two stages, as in 2D: ``base_volume`` (anatomy and lesion, depends on D, the seeds and the slice
geometry) and the 2D generator's own :func:`apply_scanner` (contrast, blur, noise, corner marker) on the whole
volume. Intensities: x in [0, 1] is HU = -1024 + 2048 x (0.5 = water), so the 2D knobs keep their meaning; lung is
-850 HU, soft tissue +40 HU, and a lesion adds the 2D lesion's ``lesion_contrast * amp`` (a -350..+300 HU nodule).

On disk, per site: ``manifest.csv`` (``image_path`` = ``images/<id>.nii.gz`` or the series folder ``images/<id>``),
``truth.csv`` (hidden structural truth and the slice geometry). NIfTI: int16 HU, RAS affine with the slice
thickness as z spacing. DICOM: one CT Image Storage file per slice, stored = HU + 1024 (12 bits, RescaleIntercept
-1024), one Study/Series/FrameOfReference UID per study, derived from the seed so regeneration is byte-identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np
import pandas as pd
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.special import expit

from simulations.generator import (
    BOX_COLUMNS,
    apply_scanner,
    set_synthetic_patient,
    lesion_params,
    manifest_from_truth,
    sample_holdout_truth,
    sample_truth,
)
from simulations.scenario import HoldoutSpec, Scenario, load_scenario, scenario_to_toml

FORMATS = ("nifti", "dicom")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
HU_MIN, HU_SPAN = -1024.0, 2048.0  # x in [0, 1] <-> HU = HU_MIN + HU_SPAN * x
STORED_OFFSET = 1024  # DICOM stored value = HU + 1024 (RescaleIntercept -1024), 0..2048 fits 12 bits

_AIR, _LUNG, _TISSUE = ((hu - HU_MIN) / HU_SPAN for hu in (-1000.0, -850.0, 40.0))
_TORSO_HALF_LENGTH = 3.0  # body ellipsoid's z semi-axis (half-FOV units): thick-slice studies still see torso
_LUNG_HALF_LENGTH = 0.75
_VESSELS = 6  # faint blobs in the lungs, so that a lesion is not found by looking for any bright spot


@dataclass(frozen=True)
class VolumeSpec:
    """The study's geometry and file format; the scanner's other traces are the scenario's 2D knobs."""

    side: int = 32
    format: str = "nifti"
    fov_mm: float = 320.0  # in-plane field of view
    modern_slice_ratio: float = 1.0  # slice thickness / in-plane spacing, S = 0
    legacy_slice_ratio: float = 2.0  # S = 1
    subslices: int = 4  # thin samples averaged per slice
    # the lesion's radius over the 2D lesion's (in field-of-view units): a volume of side 32 has half the voxels
    # across of the 2D default's 64 pixels, and a 2D lesion's size would be about one voxel wide there
    lesion_scale: float = 2.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if not 16 <= self.side <= 256:
            raise ValueError(f"side must lie in [16, 256], got {self.side}")
        if min(self.fov_mm, self.modern_slice_ratio, self.legacy_slice_ratio, self.lesion_scale) <= 0 \
                or self.subslices < 1:
            raise ValueError("fov_mm, the slice ratios, lesion_scale and subslices must be positive")

    @property
    def pixel_spacing(self) -> float:
        return self.fov_mm / self.side

    def slice_thickness(self, s: int) -> float:
        return (self.legacy_slice_ratio if int(s) == 1 else self.modern_slice_ratio) * self.pixel_spacing

    def slice_positions(self, s: int) -> np.ndarray:
        """z (mm) of each slice centre, feet to head, centred on the torso."""
        return (np.arange(self.side) - (self.side - 1) / 2.0) * self.slice_thickness(s)

    def first_pixel(self) -> tuple[float, float]:
        """(x, y) in mm (DICOM patient LPS) of pixel (row 0, column 0)'s centre."""
        c = -self.fov_mm / 2.0 + self.pixel_spacing / 2.0
        return c, c


# ----------------------------------------------------------------------------------------------------- rendering

def _axes(spec: VolumeSpec, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Thin-sample z positions (side * subslices,) and in-plane pixel centres (side,), in half-FOV units."""
    half = spec.fov_mm / 2.0
    u = (np.arange(spec.side) + 0.5) / spec.side * 2 - 1
    k = spec.subslices
    offsets = ((np.arange(k) + 0.5) / k - 0.5) * spec.slice_thickness(s)
    z = (spec.slice_positions(s)[:, None] + offsets[None, :]).ravel() / half
    return z, u


def _ellipsoid(z, y, x, c, r, edge: float) -> np.ndarray:
    """A soft-edged solid ellipsoid (1 inside, 0 outside), computed in place in the inputs' dtype."""
    d2 = ((y - c[1]) / r[1])[:, None] ** 2 + ((x - c[2]) / r[2])[None, :] ** 2
    d2 = ((z - c[0]) / r[0])[:, None, None] ** 2 + d2[None]
    np.sqrt(d2, out=d2)
    d2 -= 1.0
    d2 *= -1.0 / edge
    return expit(d2, out=d2)


def _blob(z, y, x, c, sigma: float) -> np.ndarray:
    """An isotropic Gaussian sphere, evaluated as an outer product of three 1D profiles."""
    g = [np.exp(-((a - ca) ** 2) / (2 * sigma ** 2)) for a, ca in zip((z, y, x), c)]
    return g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]


def lesion_centre(seed_lesion: int) -> tuple[float, float, float]:
    """(z, y, x) of the lesion in half-FOV units: the 2D lesion's (cy, cx) as head-foot and left-right (where a
    frontal projection puts it), the depth drawn from the lesion seed's own child stream."""
    p = lesion_params(seed_lesion)
    depth = np.random.default_rng([int(seed_lesion), 3]).uniform(-0.2, 0.2)
    return float(p["cy"]), float(depth), float(p["cx"])


def base_volume(row: Mapping[str, Any], spec: VolumeSpec, s: int) -> np.ndarray:
    """Stage 1: (z, y, x) in [0, 1] before the scanner's contrast, blur and noise. Depends on D, the anatomy and
    lesion seeds, and (through the slice geometry only) on S."""
    z, u = (a.astype(np.float32) for a in _axes(spec, s))
    j = np.random.default_rng(int(row["seed_anatomy"])).uniform(-1, 1, size=8)  # the 2D silhouette's jitter
    body = _ellipsoid(z, u, u, (0.0, 0.05 * j[0], 0.03 * j[1]),
                      (_TORSO_HALF_LENGTH, 0.62 + 0.04 * j[2], 0.85 + 0.06 * j[3]), 0.05)
    lz, lr = -0.05 + 0.05 * j[6], (_LUNG_HALF_LENGTH + 0.05 * j[4], 0.40, 0.27 + 0.03 * j[5])
    lungs = (_ellipsoid(z, u, u, (lz, -0.05, -0.36), lr, 0.08)
             + _ellipsoid(z, u, u, (lz, -0.05, 0.36 + 0.02 * j[7]), lr, 0.08)) * body
    vol = _AIR + (_TISSUE - _AIR) * body + (_LUNG - _TISSUE) * lungs
    rng = np.random.default_rng([int(row["seed_anatomy"]), 3])
    vessels = np.zeros_like(vol)
    for _ in range(_VESSELS):
        c = (lz + rng.uniform(-0.6, 0.6), rng.uniform(-0.35, 0.25), rng.choice([-1, 1]) * rng.uniform(0.2, 0.5))
        vessels += rng.uniform(0.04, 0.10) * _blob(z, u, u, c, rng.uniform(0.03, 0.06))
    vol = vol + vessels * lungs
    if int(row["D"]) == 1:
        p = lesion_params(int(row["seed_lesion"]))
        vol = vol + float(row["lesion_contrast"]) * p["amp"] * _blob(z, u, u, lesion_centre(int(row["seed_lesion"])),
                                                                       spec.lesion_scale * p["sigma"])
    vol = vol.reshape(spec.side, spec.subslices, spec.side, spec.side).mean(axis=1)  # the slice's thickness
    return np.clip(vol, 0.0, 1.0).astype(np.float64)


def render_volume(row: Mapping[str, Any], spec: VolumeSpec, s: int | None = None) -> np.ndarray:
    """One study (z, y, x) float64 in [0, 1]; ``s=None`` uses the row's own S. The scanner stage is the 2D
    generator's (its in-plane blur acts on every axis; its corner marker runs through every slice)."""
    s = int(row["S"]) if s is None else int(s)
    return apply_scanner(base_volume(row, spec, s), s, row, int(row["seed_noise"]))


def to_hu(x: np.ndarray) -> np.ndarray:
    """The storage quantisation: [0, 1] -> int16 HU, -1024..1024."""
    return (np.round(np.clip(x, 0.0, 1.0) * HU_SPAN) + HU_MIN).astype(np.int16)


# ------------------------------------------------------------------------------------------------------- writing

def nifti_affine(spec: VolumeSpec, s: int) -> np.ndarray:
    """RAS voxel-to-mm affine of the (x, y, z)-ordered array: DICOM's LPS with x and y negated."""
    x0, y0 = spec.first_pixel()
    p, t = spec.pixel_spacing, spec.slice_thickness(s)
    return np.array([[-p, 0, 0, -x0], [0, -p, 0, -y0], [0, 0, t, spec.slice_positions(s)[0]], [0, 0, 0, 1.0]])


def write_nifti(path: Path, hu: np.ndarray, spec: VolumeSpec, s: int) -> None:
    affine = nifti_affine(spec, s)
    img = nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"synthetic CT (equifed), HU"
    nib.save(img, path)


def write_dicom_series(folder: Path, hu: np.ndarray, row: Mapping[str, Any], spec: VolumeSpec, s: int,
                       uid_key: str) -> None:
    """One CT file per slice; UIDs derived from ``uid_key`` and the patient, so a rewrite is byte-identical."""
    pid = str(row["patient_id"])

    def uid(*parts: Any) -> str:
        return generate_uid(entropy_srcs=[uid_key, pid, *map(str, parts)])

    folder.mkdir(parents=True, exist_ok=True)
    x0, y0 = spec.first_pixel()
    stored = (hu.astype(np.int32) + STORED_OFFSET).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid("study"), uid("series"), uid("frame")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    set_synthetic_patient(ds, row, s)
    ds.KVP = "120"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PositionReferenceIndicator = ""
    ds.SliceThickness = ds.SpacingBetweenSlices = f"{spec.slice_thickness(s):.6g}"
    ds.PixelSpacing = [f"{spec.pixel_spacing:.6g}"] * 2
    ds.set_pixel_data(stored[0], "MONOCHROME2", 12, generate_instance_uid=False)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(-STORED_OFFSET), "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    for k, z in enumerate(spec.slice_positions(s)):  # one dataset, the per-slice elements replaced
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = uid("sop", k)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x0:.6g}", f"{y0:.6g}", f"{z:.6g}"]
        ds.SliceLocation = f"{z:.6g}"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"slice-{k:04d}.dcm", enforce_file_format=True)


def _image_path(pid: str, spec: VolumeSpec) -> str:
    return f"images/{pid}.nii.gz" if spec.format == "nifti" else f"images/{pid}"


def write_volume_site(truth: pd.DataFrame, site_dir: str | Path, spec: VolumeSpec, uid_key: str) -> Path:
    """Render every row of a sampled truth and write its studies, ``manifest.csv`` and ``truth.csv``."""
    if (truth["base_npz"].astype(str) != "").any():
        raise ValueError("volume studies are rendered from the causal model only; this truth has real 2D bases")
    site_dir = Path(site_dir)
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    for row in truth.to_dict("records"):
        s = int(row["S"])
        hu = to_hu(render_volume(row, spec, s))
        if spec.format == "nifti":
            write_nifti(site_dir / _image_path(row["patient_id"], spec), hu, spec, s)
        else:
            write_dicom_series(site_dir / _image_path(row["patient_id"], spec), hu, row, spec, s, uid_key)
    manifest = manifest_from_truth(truth)
    manifest["image_path"] = [_image_path(p, spec) for p in truth["patient_id"]]
    manifest.to_csv(site_dir / "manifest.csv", index=False)
    geometry = {"side": spec.side, "pixel_spacing_mm": spec.pixel_spacing,
                "slice_thickness_mm": [spec.slice_thickness(s) for s in truth["S"]]}
    truth.drop(columns=BOX_COLUMNS).assign(**geometry).to_csv(site_dir / "truth.csv", index=False)
    return site_dir


# ---------------------------------------------------------------------------------------------------- consortium

def cli_scenario(scenario: Scenario, sites: int, patients: int, seed: int | None, side: int,
                 holdout: int = 0) -> Scenario:
    """The scenario's first ``sites`` sites with ``patients`` each (and a pooled holdout of ``holdout`` if > 0)."""
    if not 1 <= sites <= len(scenario.sites):
        raise ValueError(f"scenario {scenario.name!r} has {len(scenario.sites)} sites; asked for {sites}")
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    kept = [dataclasses.replace(s, n=patients) for s in scenario.sites[:sites]]
    hold = HoldoutSpec(n=holdout) if holdout > 0 else None
    return dataclasses.replace(scenario, sites=kept, holdout=hold, image_size=side,
                               seed=scenario.seed if seed is None else seed)


def generate_volumes(scenario: Scenario, out_dir: str | Path, spec: VolumeSpec = VolumeSpec(),
                     overwrite: bool = False) -> list[Path]:
    """Write every site (and the holdout) of ``scenario`` as volume studies; return the site folders in order.
    ``consortium.json`` is written last, in the 2D layout (``load_consortium`` reads it)."""
    out_dir = Path(out_dir)
    names = [s.name for s in scenario.sites] + ([scenario.holdout.name] if scenario.holdout else [])
    taken = [out_dir / n for n in names if (out_dir / n).exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{taken[0]} already exists; pass overwrite=True (--overwrite) or another folder")
    for d in taken:
        shutil.rmtree(d)
    (out_dir / "consortium.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = []
    for site in scenario.sites:
        truth = sample_truth(site, scenario.seed, image_size=spec.side)
        dirs.append(write_volume_site(truth, out_dir / site.name, spec, f"equifed-volume:{scenario.seed}:{site.name}"))
    if scenario.holdout:
        write_volume_site(sample_holdout_truth(scenario), out_dir / scenario.holdout.name, spec,
                          f"equifed-volume:{scenario.seed}:{scenario.holdout.name}")
    (out_dir / "scenario.toml").write_text(scenario_to_toml(scenario))
    info = {"scenario": scenario.name, "seed": scenario.seed, "kind": "volume", "volume": dataclasses.asdict(spec),
            "site_dirs": [s.name for s in scenario.sites],
            "sites": [{"name": s.name, "dir": s.name, "n": s.n} for s in scenario.sites],
            "holdout_dir": scenario.holdout.name if scenario.holdout else None,
            "paths_relative_to": "the folder holding this file"}
    (out_dir / "consortium.json").write_text(json.dumps(info, indent=2) + "\n")
    return dirs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulations.volume_scenario",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (one subfolder per site)")
    parser.add_argument("--scenario", default="default", help="scenario TOML or shipped name (default: default)")
    parser.add_argument("--sites", type=int, default=4, help="the scenario's first N sites")
    parser.add_argument("--patients", type=int, default=150, help="patients per site")
    parser.add_argument("--side", type=int, default=32, help="voxels per axis")
    parser.add_argument("--format", choices=FORMATS, default="nifti")
    parser.add_argument("--seed", type=int, default=None, help="default: the scenario's seed")
    parser.add_argument("--holdout", type=int, default=0, help="patients in a pooled held-out folder (0: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace site folders already in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        spec = VolumeSpec(side=args.side, format=args.format)
        scenario = cli_scenario(load_scenario(args.scenario), args.sites, args.patients, args.seed, args.side,
                                args.holdout)
        dirs = generate_volumes(scenario, args.out, spec, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:  # ScenarioError is a ValueError
        print(f"volume_scenario: error: {err}", file=sys.stderr)
        return 2
    for d in dirs:
        m = pd.read_csv(d / "manifest.csv")
        print(f"{d.name}: {len(m)} studies, {int(m['label'].sum())} diseased, {int(m['scanner_legacy'].sum())} legacy")
    print(f"{len(dirs)} sites, {args.format} {args.side}^3, seed {scenario.seed}, in {time.perf_counter() - t0:.1f}s "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
