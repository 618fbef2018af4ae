"""Reading CT / MR volumes: DICOM series assembled from pydicom's own CT and MR test files (copied with edited
positions and UIDs) and nibabel's NIfTI test files, read, or refused with the reason; load_site of a volume site and
its cache."""

from __future__ import annotations

import copy
import gzip
import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from nibabel.testing import data_path as NIB_DATA
from pydicom.data import get_testdata_file

from client.policy import PolicyError, SitePolicy
from core_models.data import ImageError, ImageLimits, VolumeSettings, load_site, read_volume

SOFT = VolumeSettings.from_window("soft-tissue")  # 40 / 400 HU
_UID_ROOT = "1.2.826.0.1.3680043.8.498."


def _uid(*parts: int) -> str:
    return _UID_ROOT + ".".join(str(p) for p in parts)


def _series(folder, n=16, name="CT_small.dcm", step=5.0, series=1, positions=None, offset=None, mirror=False,
            instance_reversed=False, edit=None):
    """n copies of a pydicom test slice as one series: slice k at position z0 + step * k (or positions[k]), its
    stored values raised by offset(k) (so the order is visible), optionally stored mirrored left-right with the
    row direction flipped (the same physical volume written another way)."""
    src = pydicom.dcmread(get_testdata_file(name))
    os.makedirs(folder, exist_ok=True)
    x0, y0, z0 = (float(v) for v in src.ImagePositionPatient)
    d_col = float(src.PixelSpacing[1])
    for k in range(n):
        ds = copy.deepcopy(src)
        z = positions[k] if positions is not None else z0 + step * k
        arr = src.pixel_array.astype(np.int16) + np.int16(offset(k) if offset else 0)
        if mirror:
            arr = arr[:, ::-1]
            ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [x0 + (src.Columns - 1) * d_col, y0, z]
        else:
            ds.ImagePositionPatient = [x0, y0, z]
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        ds.SeriesInstanceUID = _uid(series)
        ds.SOPInstanceUID = _uid(series, k + 1)
        ds.InstanceNumber = n - k if instance_reversed else k + 1
        if edit is not None:
            edit(k, ds)
        ds.save_as(os.path.join(folder, f"IM{(n - k if instance_reversed else k):04d}.dcm"))
    return folder


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape
    return a.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def test_ct_series_is_hounsfield_windowed_oriented_and_resized(tmp_path):
    folder = _series(tmp_path / "ct")
    vol, meta = read_volume(folder, 16, SOFT)
    assert vol.shape == (1, 16, 16, 16) and vol.dtype == np.float32
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = src.pixel_array.astype(np.float64) * float(src.RescaleSlope) + float(src.RescaleIntercept)
    windowed = np.clip((hu - (40 - 200)) / 400, 0, 1)
    # stored (row, col) -> RAS (x, y): columns run to the patient's left and rows to posterior in LPS, so both flip
    expected = _block_mean(windowed, 8).T[::-1, ::-1]
    for z in (0, 7, 15):
        np.testing.assert_allclose(vol[0, :, :, z], expected, atol=2e-6)
    assert 0.05 < vol.mean() < 0.95  # the window is neither all air nor all bone on this slice
    assert meta["modality"] == "CT" and (meta["rows"], meta["cols"]) == (128, 128)
    assert meta["manufacturer"] == "GE MEDICAL SYSTEMS"


def test_slices_are_ordered_by_position_and_orientation_is_physical(tmp_path):
    rising = dict(offset=lambda k: 40 * k)  # each slice 40 HU brighter than the one below it
    base, _ = read_volume(_series(tmp_path / "a", **rising), 16, SOFT)
    means = base[0].mean(axis=(0, 1))
    assert np.all(np.diff(means) > 0)  # inferior -> superior along the output's z
    # the same volume with InstanceNumbers and file names reversed, and stored mirrored with a flipped row direction
    other, _ = read_volume(_series(tmp_path / "b", instance_reversed=True, mirror=True, **rising), 16, SOFT)
    np.testing.assert_array_equal(other, base)
    # positions listed from the top down give the same volume too
    top_down, _ = read_volume(_series(tmp_path / "c", step=-5.0, offset=lambda k: 40 * (15 - k)), 16, SOFT)
    np.testing.assert_array_equal(top_down, base)


def test_mr_series_is_percentile_scaled_and_a_ct_window_refused(tmp_path):
    folder = _series(tmp_path / "mr", n=8, name="MR_small.dcm", step=2.0)
    vol, meta = read_volume(folder, 8, VolumeSettings(percentiles=(0.0, 100.0)))
    assert meta["modality"] == "MR" and vol.shape == (1, 8, 8, 8)
    arr = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float64)
    expected = _block_mean((arr - arr.min()) / (arr.max() - arr.min()), 8).T[::-1, ::-1]  # min-max, 64 -> 8
    np.testing.assert_allclose(vol[0, :, :, 3], expected, atol=2e-6)
    with pytest.raises(ImageError, match="CT window .* series is MR"):
        read_volume(folder, 8, SOFT)


@pytest.mark.parametrize("case, reason", [
    ("missing", r"missing slice: a gap of 10 mm .* 5 mm apart \(1 slice\(s\) missing\)"),
    ("mixed", r"mixed series in one folder: 2 SeriesInstanceUIDs"),
    ("duplicate", r"duplicated slice position"),
    ("uneven", r"inconsistent slice spacing: gaps from 5 to 7 mm"),
    ("pixel_spacing", r"inconsistent pixel spacing"),
    ("orientation", r"inconsistent orientation"),
    ("tilt", r"not stacked along the slice normal"),
    ("multi_frame", r"multi-frame DICOM \(rtdose.dcm, 15 frames\)"),
    ("multi_frame_rgb", r"multi-frame DICOM \(SC_rgb_rle_2frame.dcm, 2 frames\)"),
    ("not_dicom", r"not a readable DICOM image: notes.txt"),
    ("single", r"1 slice\(s\); a volume needs at least 2"),
])
def test_bad_series_refused_with_reason(tmp_path, case, reason):
    folder = tmp_path / case
    if case == "missing":
        _series(folder, n=6)
        os.remove(folder / "IM0003.dcm")
    elif case == "mixed":
        _series(folder, n=3)
        _series(tmp_path / "other", n=3, series=2)
        shutil.copy(tmp_path / "other" / "IM0000.dcm", folder / "X0000.dcm")
    elif case == "duplicate":
        _series(folder, n=4, positions=[0.0, 5.0, 5.0, 10.0])
    elif case == "uneven":
        _series(folder, n=4, positions=[0.0, 5.0, 10.0, 17.0])
    elif case == "pixel_spacing":
        _series(folder, n=4, edit=lambda k, ds: setattr(ds, "PixelSpacing", [0.7, 0.7]) if k == 2 else None)
    elif case == "orientation":
        _series(folder, n=4, edit=lambda k, ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.8, 0.6])
                if k == 3 else None)
    elif case == "tilt":
        _series(folder, n=4, edit=lambda k, ds: setattr(ds, "ImagePositionPatient",
                                                        [ds.ImagePositionPatient[0], -180.0 + 2.0 * k,
                                                         ds.ImagePositionPatient[2]]))
    elif case in ("multi_frame", "multi_frame_rgb"):
        folder.mkdir()
        shutil.copy(get_testdata_file("rtdose.dcm" if case == "multi_frame" else "SC_rgb_rle_2frame.dcm"), folder)
    elif case == "not_dicom":
        _series(folder, n=3)
        (folder / "notes.txt").write_text("exported by PACS\n")
    elif case == "single":
        _series(folder, n=1)
    with pytest.raises(ImageError, match=reason):
        read_volume(folder, 8, SOFT)


def test_caps_refuse_from_headers_before_decoding(tmp_path):
    folder = _series(tmp_path / "ct", n=4)
    victim = folder / "IM0002.dcm"  # pixel data cut short: decoding it would fail with another reason
    victim.write_bytes(victim.read_bytes()[:-1000])
    with pytest.raises(ImageError, match="more than 3 files"):
        read_volume(folder, 8, SOFT, limits=ImageLimits(max_slices=3))
    with pytest.raises(ImageError, match=r"volume too large: 128 x 128 x 4 = 65,536 voxels"):
        read_volume(folder, 8, SOFT, limits=ImageLimits(max_voxels=128 * 128 * 4 - 1))
    with pytest.raises(ImageError, match="series too large"):
        read_volume(folder, 8, SOFT, limits=ImageLimits(max_volume_bytes=100_000))
    with pytest.raises(ImageError, match="cannot decode pixel data of IM0002.dcm"):  # within the caps: decoded
        read_volume(folder, 8, SOFT)


def test_series_file_linked_out_of_the_site_refused(tmp_path):
    site = tmp_path / "site"
    folder = _series(site / "ct", n=3)
    _series(tmp_path / "elsewhere", n=4)
    os.symlink(tmp_path / "elsewhere" / "IM0003.dcm", folder / "IM0003.dcm")
    with pytest.raises(ImageError, match="volume path points outside the site folder"):
        read_volume(folder, 8, SOFT, site_dir=site)
    os.remove(folder / "IM0003.dcm")
    os.symlink(tmp_path / "elsewhere", folder / "sub")
    with pytest.raises(ImageError, match="outside the site folder"):
        read_volume(folder, 8, SOFT, site_dir=site)


def _canonical_reference(path, side, lower=0.5, upper=99.5):
    """The same volume through nibabel's own reorientation (as_closest_canonical), numpy percentiles and torch's
    area pooling: an independent route to what read_volume should give."""
    img = nib.as_closest_canonical(nib.load(path))
    data = img.get_fdata(dtype=np.float32)
    lo, hi = np.percentile(data, [lower, upper])
    scaled = np.clip((data - lo) / (hi - lo), 0, 1)
    pooled = F.adaptive_avg_pool3d(torch.from_numpy(scaled)[None, None], (side, side, side))
    return pooled[0].numpy()


def test_nifti_read_like_nibabel_in_every_container(tmp_path):
    path = os.path.join(NIB_DATA, "anatomical.nii")  # LAS orientation: x must flip
    vol, meta = read_volume(path, 16)
    np.testing.assert_allclose(vol, _canonical_reference(path, 16), atol=1e-5)
    assert (meta["cols"], meta["rows"], meta["modality"]) == (33, 41, None)
    gz = tmp_path / "anatomical.nii.gz"
    gz.write_bytes(gzip.compress(open(path, "rb").read()))
    np.testing.assert_array_equal(read_volume(gz, 16)[0], vol)
    img = nib.load(path)
    nib.save(nib.Nifti2Image(np.asarray(img.dataobj), img.affine), tmp_path / "anatomical2.nii")
    np.testing.assert_array_equal(read_volume(tmp_path / "anatomical2.nii", 16)[0], vol)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "example_nifti2.nii.gz"])
def test_4d_nifti_refused(name):
    with pytest.raises(ImageError, match=r"4-D image \(\d+, \d+, \d+, 2\)"):
        read_volume(os.path.join(NIB_DATA, name), 8)


@pytest.mark.parametrize("srow_z, reason", [
    ([0.0, 0.0, 0.0, 0.0], "bad affine in bad.nii: singular"),
    ([0.0, 0.0, np.nan, 0.0], "bad affine in bad.nii: non-finite"),
])
def test_nifti_bad_affine_refused(tmp_path, srow_z, reason):
    raw = bytearray(open(os.path.join(NIB_DATA, "anatomical.nii"), "rb").read())
    hdr = nib.Nifti1Header(bytes(raw[:348]))  # the sform (used over the qform when its code is set) edited in place
    hdr["srow_z"] = srow_z
    hdr["sform_code"] = 1
    raw[:348] = hdr.binaryblock
    (tmp_path / "bad.nii").write_bytes(bytes(raw))
    with pytest.raises(ImageError, match=reason):
        read_volume(tmp_path / "bad.nii", 8)


def test_truncated_nifti_refused(tmp_path):
    raw = open(os.path.join(NIB_DATA, "anatomical.nii"), "rb").read()
    (tmp_path / "cut.nii").write_bytes(raw[:-100])
    with pytest.raises(ImageError, match="truncated NIfTI file cut.nii"):
        read_volume(tmp_path / "cut.nii", 8)
    (tmp_path / "big.nii").write_bytes(raw)
    with pytest.raises(ImageError, match="volume too large: 33 x 41 x 25"):
        read_volume(tmp_path / "big.nii", 8, limits=ImageLimits(max_voxels=33 * 41 * 25 - 1))


def test_spacing_keeps_physical_size(tmp_path):
    # 16 slices 5 mm apart, 128 x 0.66 mm in-plane: 84.7 x 84.7 x 80 mm; at 8 mm voxels ~ 11 x 11 x 10 of 16^3
    vol, _ = read_volume(_series(tmp_path / "ct"), 16, VolumeSettings(window_center=40, window_width=400,
                                                                      spacing=8.0))
    filled = np.flatnonzero(vol[0].max(axis=(1, 2)) > 0)
    assert vol.shape == (1, 16, 16, 16) and 9 <= len(filled) <= 12
    assert np.all(vol[0, :, :, 0] == 0) and np.all(vol[0, :, :, 15] == 0)  # zero padding above and below


def test_load_site_of_volumes_and_its_cache(tmp_path, caplog):
    site = tmp_path / "site"
    _series(site / "p1", n=8, offset=lambda k: 20 * k)
    _series(site / "p2", n=8, series=2, step=2.5)
    _series(site / "p3", n=5)
    os.remove(site / "p3" / "IM0002.dcm")
    shutil.copy(os.path.join(NIB_DATA, "anatomical.nii"), site / "p4.nii")
    shutil.copy(os.path.join(NIB_DATA, "example4d.nii.gz"), site / "p5.nii.gz")
    shutil.copy(get_testdata_file("CT_small.dcm"), site / "p6.dcm")
    rows = ["patient_id,image_path,label", "a,p1,0", "b,p2,1", "c,p3,1", "d,p4.nii,0", "e,p5.nii.gz,1", "f,p6.dcm,0",
            "g,../outside,1"]
    (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    settings = VolumeSettings(window_center=40, window_width=400)
    with caplog.at_level(logging.INFO, logger="core_models.data.site"):
        first = load_site(site, image_size=8, volume=settings)
    assert first.images.shape == (3, 1, 8, 8, 8) and first.images.dtype == np.float32
    assert list(first.labels) == [0, 1, 0] and list(first.frame["patient_id"]) == ["a", "b", "d"]
    assert list(first.frame["modality"].fillna("")) == ["CT", "CT", ""]
    assert first.unlabelled.shape == (0, 1, 8, 8, 8)
    reasons = {r.image_path: r.reason for r in first.rejected}
    assert reasons["p3"].startswith("missing slice") and reasons["p5.nii.gz"].startswith("4-D image")
    assert reasons["p6.dcm"].startswith("not a volume") and "outside the site folder" in reasons["../outside"]
    np.testing.assert_allclose(first.images[0], read_volume(site / "p1", 8, settings)[0], atol=1.0 / 65535)
    assert not any("from cache" in m for m in caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="core_models.data.site"):
        second = load_site(site, image_size=8, volume=settings)
    assert any("3 images from cache" in m for m in caplog.messages)
    np.testing.assert_array_equal(second.images, first.images)
    assert [r.reason for r in second.rejected] == [r.reason for r in first.rejected]
    assert list((site / ".equifed_cache").glob("manifest-v8-k2-*.npz"))
    # a slice touched (new mtime) or another window: decoded again
    st = os.stat(site / "p1" / "IM0004.dcm")
    os.utime(site / "p1" / "IM0004.dcm", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="core_models.data.site"):
        load_site(site, image_size=8, volume=settings)
        lung = load_site(site, image_size=8, volume=VolumeSettings.from_window("lung"))
    assert not any("from cache" in m for m in caplog.messages)
    assert not np.array_equal(lung.images, first.images)
    # a 2-D load of another site is unaffected by the new argument
    with pytest.raises(ValueError, match="channels must be 1"):
        load_site(site, image_size=8, volume=settings, channels=3)


def test_volume_settings_validation():
    assert VolumeSettings.from_window("lung") == VolumeSettings(window_center=-600.0, window_width=1500.0)
    assert VolumeSettings.from_window(" 50, 350 ") == VolumeSettings(window_center=50.0, window_width=350.0)
    assert VolumeSettings.from_window("none").window_center is None
    for bad in ("wide", "1,2,3", "40,-5"):
        with pytest.raises(ValueError):
            VolumeSettings.from_window(bad)
    with pytest.raises(ValueError):
        VolumeSettings(window_center=40.0)
    with pytest.raises(ValueError):
        VolumeSettings(spacing=0.0)
    with pytest.raises(ValueError):
        VolumeSettings(percentiles=(50.0, 50.0))
    assert VolumeSettings().key != VolumeSettings(spacing=1.0).key != SOFT.key


def _site_limits(site, toml: str, node_config: dict | None = None) -> ImageLimits:
    """The caps a site's own settings give (what client/site.py passes to load_site)."""
    (site / "site.toml").write_text(toml)
    return SitePolicy.load(site, node_config).image_limits()


def test_site_max_slices_refuses_a_longer_series_with_the_reason(tmp_path):
    site = tmp_path / "site"
    _series(site / "long", n=4)
    _series(site / "short", n=3, series=2)
    (site / "manifest.csv").write_text("patient_id,image_path,label\na,long,0\nb,short,1\n")
    limits = _site_limits(site, "max-slices = 3\n")
    assert limits.max_slices == 3
    sd = load_site(site, image_size=8, volume=SOFT, limits=limits)
    assert list(sd.frame["patient_id"]) == ["b"]
    assert [(r.image_path, r.reason) for r in sd.rejected] == [
        ("long", "series folder has more than 3 files (the limit per volume)")]
    # the stricter source wins; a setting never raises the data layer's cap
    assert _site_limits(site, "max-slices = 3\n", {"max-slices": 2}).max_slices == 2
    assert _site_limits(site, "max-slices = 3\n", {"max-slices": 100}).max_slices == 3
    assert _site_limits(site, "max-slices = 100000\n").max_slices == ImageLimits().max_slices
    with pytest.raises(PolicyError, match="max-slices must be a whole number"):
        _site_limits(site, "max-slices = 2.5\n")


def test_site_max_volume_mb_refuses_a_nifti(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(os.path.join(NIB_DATA, "anatomical.nii"), site / "a.nii")  # 33 x 41 x 25 int16: 67,650 voxel bytes
    small = _site_limits(site, "max-volume-mb = 0.06\n")  # 62,914 bytes
    assert small.max_volume_bytes == int(0.06 * 1024**2)
    with pytest.raises(ImageError, match=r"volume too large: 0\.1 MiB of voxels"):
        read_volume(site / "a.nii", 8, limits=small, site_dir=site)
    enough = _site_limits(site, "max-volume-mb = 0.07\n")  # 73,400 bytes
    np.testing.assert_array_equal(read_volume(site / "a.nii", 8, limits=enough, site_dir=site)[0],
                                  read_volume(site / "a.nii", 8, site_dir=site)[0])
    assert _site_limits(site, "max-volume-mb = 1e6\n").max_volume_bytes == ImageLimits().max_volume_bytes
    with pytest.raises(PolicyError, match="max-volume-mb must be in"):
        _site_limits(site, "max-volume-mb = 0\n")


def test_uncompressed_nifti_file_is_capped_by_the_volume_bytes(tmp_path):
    src = os.path.join(NIB_DATA, "anatomical.nii")  # 352-byte header + 67,650 voxel bytes
    path = tmp_path / "a.nii"
    shutil.copy(src, path)
    expected = read_volume(path, 8)[0]
    # a file far over max_file_bytes is read when its voxels are within max_volume_bytes
    np.testing.assert_array_equal(
        read_volume(path, 8, limits=ImageLimits(max_file_bytes=1000, max_volume_bytes=67_650))[0], expected)
    with pytest.raises(ImageError, match="volume too large: .* of voxels"):
        read_volume(path, 8, limits=ImageLimits(max_file_bytes=1000, max_volume_bytes=67_649))
    # the file itself: the voxel bytes plus a 16 MiB header allowance (sparse padding: nothing written)
    allowance = 67_650 + 16 * 1024**2
    os.truncate(path, allowance)
    np.testing.assert_array_equal(read_volume(path, 8, limits=ImageLimits(max_volume_bytes=67_650))[0], expected)
    os.truncate(path, allowance + 1)
    with pytest.raises(ImageError, match=r"volume file too large: 16\.1 MiB \(limit 16\.1 MiB\)"):
        read_volume(path, 8, limits=ImageLimits(max_volume_bytes=67_650))
    # a .nii.gz stays capped by max_file_bytes (the voxels it inflates to by max_volume_bytes)
    gz = tmp_path / "a.nii.gz"
    gz.write_bytes(gzip.compress(open(src, "rb").read()))
    size = gz.stat().st_size
    np.testing.assert_array_equal(read_volume(gz, 8, limits=ImageLimits(max_file_bytes=size))[0], expected)
    with pytest.raises(ImageError, match="volume file too large"):
        read_volume(gz, 8, limits=ImageLimits(max_file_bytes=size - 1))


def test_slice_caps_apply_to_series_slices_and_nifti_planes(tmp_path):
    site = tmp_path / "site"
    _series(site / "ct", n=3)  # 128 x 128 slices
    shutil.copy(os.path.join(NIB_DATA, "anatomical.nii"), site / "a.nii")  # 33 x 41 planes, 25 of them
    limits = _site_limits(site, f"max-image-pixels = {128 * 128 - 1}\n")
    with pytest.raises(ImageError, match=r"image too large: 128 x 128 pixels \(limit 16,383"):
        read_volume(site / "ct", 8, SOFT, limits=limits, site_dir=site)
    with pytest.raises(ImageError, match=r"image too large: 41 x 33 pixels \(limit 1,352"):
        read_volume(site / "a.nii", 8, limits=ImageLimits(max_pixels=33 * 41 - 1))
    with pytest.raises(ImageError, match="volume has 25 slices, more than 24"):
        read_volume(site / "a.nii", 8, limits=ImageLimits(max_pixels=33 * 41, max_slices=24))
    vol, _ = read_volume(site / "a.nii", 8, limits=ImageLimits(max_pixels=33 * 41, max_slices=25))
    assert vol.shape == (1, 8, 8, 8)
