"""Synthetic CT volumes: the 2D scenario's patients, reproducible files, NIfTI and DICOM geometry, the lesion and the
scanner's traces."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage
from scipy.stats import spearmanr

from simulations.generator import generate_consortium, lesion_params, load_consortium, read_truth, sample_truth
from simulations.scenario import load_scenario, scenario_from_dict
from simulations.volume_scenario import (
    VolumeSpec,
    base_volume,
    cli_scenario,
    generate_volumes,
    main,
    render_volume,
    to_hu,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFEST_KEYS = ["patient_id", "label", "site", "group", "age", "scanner_legacy", "sex"]


def scenario(n: int = 30, seed: int = 5, sites: int = 2):
    return scenario_from_dict({
        "name": "vol", "seed": seed, "image_size": 16,
        "defaults": {"n": n, "p_s_a0": 0.3, "p_s_a1": 0.7, "prevalence": 0.5},
        "sites": [{"name": f"h{i}"} for i in range(sites)],
    })


@pytest.fixture(scope="module")
def nifti_sites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nifti")
    generate_volumes(scenario(), out, VolumeSpec(side=32, format="nifti"))
    return out


@pytest.fixture(scope="module")
def dicom_site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dicom")
    generate_volumes(scenario(n=6, sites=1), out, VolumeSpec(side=32, format="dicom"))
    return out / "h0"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hu(site: Path, path: str) -> np.ndarray:
    """A NIfTI study as (z, y, x) HU, the renderer's axis order."""
    return np.asarray(nib.load(site / path).dataobj).transpose(2, 1, 0)


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_same_seed_same_files_other_seed_other_patients(tmp_path, fmt):
    spec = VolumeSpec(side=16, format=fmt)
    for run in ("a", "b"):
        generate_volumes(scenario(n=4, sites=1), tmp_path / run, spec)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 2 + 4 * (1 if fmt == "nifti" else 16) + 2  # manifest, truth, studies, toml, json
    assert first == second
    generate_volumes(scenario(n=4, sites=1, seed=6), tmp_path / "c", spec)
    other = _files(tmp_path / "c")
    assert other.keys() == first.keys()
    assert sum(other[k] != first[k] for k in first if k.startswith("h0/images")) >= 3


def test_patients_are_the_2d_scenarios(tmp_path, nifti_sites):
    """Volumes and the 2D consortium of one scenario: the same patients, labels, groups and scanners."""
    dirs_2d = generate_consortium(scenario(), tmp_path / "flat")
    for d2 in dirs_2d:
        m2 = pd.read_csv(d2 / "manifest.csv")
        m3 = pd.read_csv(nifti_sites / d2.name / "manifest.csv")
        pd.testing.assert_frame_equal(m3[MANIFEST_KEYS], m2[MANIFEST_KEYS])
        assert (m3["image_path"] == "images/" + m3["patient_id"] + ".nii.gz").all()
        assert m3["label"].nunique() == 2 and m3["scanner_legacy"].nunique() == 2
    assert load_consortium(nifti_sites) == ([nifti_sites / "h0", nifti_sites / "h1"], None)


def test_nifti_holds_the_render_with_its_geometry(nifti_sites):
    spec = VolumeSpec(side=32)
    truth = read_truth(nifti_sites / "h0")
    manifest = pd.read_csv(nifti_sites / "h0" / "manifest.csv")
    for row, path in list(zip(truth.to_dict("records"), manifest["image_path"]))[:8]:
        img = nib.load(nifti_sites / "h0" / path)
        assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.int16
        t = 20.0 if row["S"] == 1 else 10.0  # legacy: 2 x the 10 mm in-plane spacing
        assert img.header.get_zooms() == pytest.approx((10.0, 10.0, t))
        assert row["slice_thickness_mm"] == pytest.approx(t)
        assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        centre = img.affine @ np.array([15.5, 15.5, 15.5, 1.0])
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)  # the grid is centred on the torso
        np.testing.assert_array_equal(_hu(nifti_sites / "h0", path), to_hu(render_volume(row, spec)))


def test_dicom_series_geometry_and_pixels(dicom_site, tmp_path):
    manifest = pd.read_csv(dicom_site / "manifest.csv")
    truth = read_truth(dicom_site)
    nifti = tmp_path / "nifti"
    generate_volumes(scenario(n=6, sites=1), nifti, VolumeSpec(side=32, format="nifti"))
    series_uids = set()
    for path, s in zip(manifest["image_path"], truth["S"]):
        files = sorted((dicom_site / path).iterdir())
        slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
        assert len(slices) == 32
        assert len({d.SeriesInstanceUID for d in slices}) == len({d.StudyInstanceUID for d in slices}) == 1
        assert len({d.SOPInstanceUID for d in slices}) == 32
        series_uids.add(slices[0].SeriesInstanceUID)
        thickness = 20.0 if s == 1 else 10.0
        pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in slices])
        np.testing.assert_allclose(np.diff(pos[:, 2]), thickness)
        np.testing.assert_allclose(pos[:, :2], -155.0)  # first pixel centre: -fov/2 + spacing/2
        for d in slices:
            assert d.Modality == "CT" and d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
            assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in d.PixelSpacing] == [10.0, 10.0]
            assert float(d.SliceThickness) == thickness
            assert str(d.PatientName).startswith("SYNTHETIC^") and d.PatientBirthDate == ""
        hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
        img = nib.load(nifti / "h0" / (path + ".nii.gz"))  # the same study as NIfTI: same voxels, same place
        np.testing.assert_array_equal(hu, np.asarray(img.dataobj).transpose(2, 1, 0))
        for k in (0, 31):  # RAS = LPS with x and y negated
            np.testing.assert_allclose(img.affine @ [0, 0, k, 1], [-pos[k, 0], -pos[k, 1], pos[k, 2], 1])
    assert len(series_uids) == len(manifest)


def _lesion_voxels(hu: np.ndarray) -> int:
    """Bright voxels inside the lungs, read off the study alone: a lung is a dark hole in each sagittal slice of the
    body (closed in that plane, so that a lesion on the lung's wall stays inside)."""
    bright = ndimage.gaussian_filter(hu.astype(float), 1.0) > -400
    body = np.stack([ndimage.binary_fill_holes(bright[:, :, i]) for i in range(hu.shape[2])], axis=2)
    lungs = ndimage.binary_closing(body & ~bright, structure=np.ones((7, 7, 1)))
    return int((lungs & bright).sum())


def test_diseased_studies_hold_more_bright_lesion_voxels(nifti_sites):
    counts = {0: [], 1: []}
    for site in ("h0", "h1"):
        m = pd.read_csv(nifti_sites / site / "manifest.csv")
        for path, label in zip(m["image_path"], m["label"]):
            counts[int(label)].append(_lesion_voxels(_hu(nifti_sites / site, path)))
    assert len(counts[0]) >= 20 and len(counts[1]) >= 20
    assert np.mean(counts[0]) < 1.0
    assert np.mean(counts[1]) > 4.0
    assert np.mean(np.array(counts[1]) > 0) > 0.3


def test_lesion_size_and_contrast_follow_the_2d_parameters():
    """The lesion (study with D = 1 minus the same study with D = 0, noise-free): its peak follows the 2D lesion's
    contrast * amp and its extent the 2D sigma; thick slices lower the peak (partial volume)."""
    site = dataclasses.replace(scenario().sites[0], lesion_contrast=0.3)
    rows = sample_truth(site, 5, 30).to_dict("records")
    spec = VolumeSpec(side=32, lesion_scale=1.0)  # the 2D lesion's own size
    peak, extent, strength, sigma, thick_over_thin = [], [], [], [], []
    for row in rows:
        lesion = {s: base_volume({**row, "D": 1}, spec, s) - base_volume({**row, "D": 0}, spec, s) for s in (0, 1)}
        p = lesion_params(int(row["seed_lesion"]))
        peak.append(lesion[0].max())
        extent.append(int((lesion[0] > 0.05).sum()))
        strength.append(0.3 * p["amp"])
        sigma.append(p["sigma"])
        thick_over_thin.append(lesion[1].max() / lesion[0].max())
    assert spearmanr(strength, peak).statistic > 0.8
    assert spearmanr(sigma, extent).statistic > 0.6
    assert np.median(np.array(peak) / np.array(strength)) == pytest.approx(1.0, abs=0.1)
    assert np.mean(thick_over_thin) < 0.97
    row = rows[int(np.argmax(strength))]
    wide = base_volume({**row, "D": 1}, VolumeSpec(side=32), 0) - base_volume({**row, "D": 0}, VolumeSpec(side=32), 0)
    assert (wide > 0.05).sum() > 4 * extent[int(np.argmax(strength))]  # the default: twice the radius


def _noise(hu: np.ndarray) -> float:
    """Median absolute step between in-plane neighbours in soft tissue: the scanner's noise."""
    tissue = (hu[:, :, 1:] > -300) & (hu[:, :, :-1] > -300)
    return float(np.median(np.abs(np.diff(hu.astype(float), axis=2))[tissue]))


def test_scanner_trace_differs_between_mediator_levels(nifti_sites):
    m = pd.read_csv(nifti_sites / "h0" / "manifest.csv")
    noise = np.array([_noise(_hu(nifti_sites / "h0", p)) for p in m["image_path"]])
    legacy = m["scanner_legacy"].to_numpy() == 1
    assert noise[legacy].min() > 1.3 * noise[~legacy].max()  # legacy noise std 0.06 vs 0.03
    zooms = np.array([nib.load(nifti_sites / "h0" / p).header.get_zooms()[2] for p in m["image_path"]])
    np.testing.assert_array_equal(zooms, np.where(legacy, 20.0, 10.0))
    row = read_truth(nifti_sites / "h0").to_dict("records")[0]  # the same patient, scanner switched
    spec = VolumeSpec(side=32)
    assert _noise(to_hu(render_volume(row, spec, 1))) > 1.3 * _noise(to_hu(render_volume(row, spec, 0)))


def test_cli_writes_a_consortium_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--sites", "2", "--patients", "3", "--side", "16", "--seed", "9"]) == 0
    info = json.loads((out / "consortium.json").read_text())
    assert info["seed"] == 9 and info["site_dirs"] == ["st_aurelia", "northgate_general"]
    assert info["volume"]["side"] == 16 and info["volume"]["format"] == "nifti"
    default = cli_scenario(load_scenario("default"), 2, 3, 9, 16)
    for site in default.sites:
        labels = pd.read_csv(out / site.name / "manifest.csv")["label"].to_numpy()
        np.testing.assert_array_equal(labels, sample_truth(site, 9)["D"].to_numpy())
    assert main(["--out", str(out), "--sites", "2", "--patients", "3", "--side", "16"]) == 2  # already there
    assert main(["--out", str(tmp_path / "x"), "--sites", "5", "--patients", "3"]) == 2  # default has 4 sites
    assert "has 4 sites" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simulations.volume_scenario", "--out", str(tmp_path / "m"),
                           "--sites", "1", "--patients", "2", "--side", "16", "--format", "dicom", "--seed", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = pd.read_csv(tmp_path / "m" / "st_aurelia" / "manifest.csv")
    assert len(m) == 2 and all(len(list((tmp_path / "m" / "st_aurelia" / p).glob("*.dcm"))) == 16
                               for p in m["image_path"])
