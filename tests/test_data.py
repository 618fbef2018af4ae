"""Tests for core_models.data: manifest validation, DICOM/PNG/npz decoding, rejections and the decoded-image cache."""

from __future__ import annotations

import csv
import os
import tempfile

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, MPEG2MPML, generate_uid

from core_models.data import (
    ImageError,
    META_COLUMNS,
    ManifestError,
    Rejection,
    SiteData,
    load_npz,
    load_site,
    parse_dicom_age,
    read_dicom,
    read_image,
    read_manifest,
    write_rejected,
)
from core_models.data import dicom_intensity
from core_models.data import site as data_site

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def write_dicom(path, pixels=None, *, sop=DX, ts=ExplicitVRLittleEndian, photometric="MONOCHROME2",
                samples=1, frames=None, pixel_data=None, rows_cols=None, **attrs):
    """Write a small DICOM file; pixels is a uint16/int16 (H, W), (H, W, 3) or (F, H, W) array."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P1"
    ds.Modality = "DX"
    if pixels is not None or pixel_data is not None:
        if pixels is not None:
            pixels = np.asarray(pixels)
            shape = pixels.shape[1:3] if frames else pixels.shape[:2]
            signed = pixels.dtype.kind == "i"
            bits = pixels.dtype.itemsize * 8
            pixel_data = pixels.tobytes()
        else:
            shape, signed, bits = rows_cols, False, 16
        ds.Rows, ds.Columns = (int(v) for v in shape)
        ds.SamplesPerPixel = samples
        if samples > 1:
            ds.PlanarConfiguration = 0
        if frames:
            ds.NumberOfFrames = frames
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = bits
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.PixelData = pixel_data
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(h=16, w=16, top=4000):
    return np.linspace(0, top, h * w).reshape(h, w).astype(np.uint16)


def write_manifest(path, rows, header=("patient_id", "image_path", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------------------ DICOM


def test_minmax_without_window_spans_zero_to_one(tmp_path):
    px = ramp()
    img, meta = read_dicom(write_dicom(tmp_path / "a.dcm", px))
    assert img.dtype == np.float32 and img.shape == (16, 16)
    expected = (px.astype(np.float64) - px.min()) / (px.max() - px.min())
    np.testing.assert_allclose(img, expected, atol=1e-6)
    assert meta["rows"] == 16 and meta["cols"] == 16


def test_rescale_slope_intercept_feeds_window_in_modality_units(tmp_path):
    # CT: HU = 0.5 * stored - 1024; window C=40 W=400 in HU (pydicom's LINEAR: c-0.5, w-1).
    px = np.array([[0, 2048, 2128, 2048 + 2 * 240, 4000] + [0] * 11] * 16, dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", px, sop=CT, Modality="CT", RescaleSlope=0.5, RescaleIntercept=-1024,
                       WindowCenter=40, WindowWidth=400)
    img, _ = read_dicom(path)
    hu = px[0, :5] * 0.5 - 1024  # [-1024, 0, 40, 216, 976]
    expected = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(img[0, :5], expected, atol=1e-5)
    assert img[0, 2] == pytest.approx(0.50125, abs=1e-4)  # HU 40 is the window centre
    # Without the rescale, the same stored values would all sit above the window.
    img_raw, _ = read_dicom(write_dicom(tmp_path / "raw.dcm", px, WindowCenter=40, WindowWidth=400))
    assert img_raw[0, 1] == 1.0 and img[0, 1] < 0.45


def test_negative_slope_flips_minmax(tmp_path):
    px = ramp()
    img, _ = read_dicom(write_dicom(tmp_path / "neg.dcm", px, RescaleSlope=-1, RescaleIntercept=0))
    expected = (px.max() - px.astype(np.float64)) / (px.max() - px.min())
    np.testing.assert_allclose(img, expected, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    px = ramp()
    m2, _ = read_dicom(write_dicom(tmp_path / "m2.dcm", px, photometric="MONOCHROME2"))
    m1, _ = read_dicom(write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1"))
    bright = np.unravel_index(np.argmax(px), px.shape)
    assert m2[bright] == 1.0 and m1[bright] == 0.0
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_windowing_clips_and_centres(tmp_path):
    px = np.zeros((16, 16), dtype=np.uint16)
    px[0, :4] = [500, 900, 1000, 1500]
    img, _ = read_dicom(write_dicom(tmp_path / "w.dcm", px, WindowCenter=1000, WindowWidth=200))
    assert img[0, 0] == 0.0 and img[0, 1] == 0.0  # below / at the lower edge
    assert img[0, 3] == 1.0  # above
    assert img[0, 2] == pytest.approx(0.5, abs=0.01)
    assert img[5, 5] == 0.0


def test_multivalued_window_uses_first(tmp_path):
    px = np.zeros((16, 16), dtype=np.uint16)
    px[0, 0] = 1000
    img, _ = read_dicom(write_dicom(tmp_path / "w2.dcm", px, WindowCenter=[1000, 3000], WindowWidth=[200, 500]))
    assert img[0, 0] == pytest.approx(0.5, abs=0.01)  # second window would give 0


def test_voi_lut_sequence_8bit_with_4096_entries(tmp_path):
    # pydicom 3.0.2 wraps indices of an 8-bit LUT above 255; the decoder works around it.
    lut = (np.arange(4096) // 16).astype(np.uint16)  # 0..255
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 8])
    item.add_new(0x00283006, "US", lut.tolist())
    px = np.zeros((16, 16), dtype=np.uint16)
    px[0, :4] = [0, 256, 1000, 4095]
    img, _ = read_dicom(write_dicom(tmp_path / "lut.dcm", px, VOILUTSequence=[item]))
    np.testing.assert_allclose(img[0, :4], lut[[0, 256, 1000, 4095]] / 255.0, atol=1e-6)


def test_shared_intensity_tables_follow_each_header(tmp_path):
    # Same header, different pixel ranges: min-max is per image even though the table is shared.
    a = ramp(top=1000)
    b = ramp(top=3000) + 500
    ia, _ = read_dicom(write_dicom(tmp_path / "a.dcm", a, RescaleSlope=1, RescaleIntercept=-1024))
    ib, _ = read_dicom(write_dicom(tmp_path / "b.dcm", b, RescaleSlope=1, RescaleIntercept=-1024))
    np.testing.assert_allclose(ia, a / 1000.0, atol=1e-6)
    np.testing.assert_allclose(ib, (b - 500) / 3000.0, atol=1e-6)
    # Headers differing only in the window centre must not share a table.
    px = np.full((16, 16), 1000, dtype=np.uint16)
    w1, _ = read_dicom(write_dicom(tmp_path / "w1.dcm", px, WindowCenter=1000, WindowWidth=200))
    w2, _ = read_dicom(write_dicom(tmp_path / "w2.dcm", px, WindowCenter=1100, WindowWidth=200))
    assert w1[0, 0] == pytest.approx(0.5, abs=0.01) and w2[0, 0] == 0.0


@pytest.mark.parametrize("seed", range(8))
def test_table_path_equals_direct_pydicom_path(seed):
    """Shared tables / their affine form must give what pydicom's helpers give applied to every pixel."""
    rng = np.random.default_rng(seed)
    signed = seed % 2 == 1
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME1" if seed % 3 == 0 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, 12, int(signed)
    if seed % 3 != 2:
        ds.RescaleSlope, ds.RescaleIntercept = float(rng.choice([0.5, 1.0, 2.5, -1.0])), float(rng.integers(-2000, 100))
    if seed >= 2:
        ds.WindowCenter, ds.WindowWidth = float(rng.integers(-500, 1500)), float(rng.integers(50, 2000))
    if seed >= 6:
        ds.VOILUTFunction = "SIGMOID"  # not affine: served by the gather
    lo, hi = (-2048, 2047) if signed else (0, 4095)
    arr = rng.integers(lo, hi + 1, (32, 32)).astype(np.int16 if signed else np.uint16)
    kind = dicom_intensity._voi_kind(ds)
    direct = dicom_intensity._direct_intensity(arr, ds, ds.PhotometricInterpretation, kind)
    dicom_intensity._TABLES.clear()
    for _ in range(2):  # built, then reused
        np.testing.assert_allclose(dicom_intensity._dicom_intensity(arr, ds, ds.PhotometricInterpretation), direct,
                                   atol=1e-6)


def test_signed_ct_hounsfield_window(tmp_path):
    px = np.zeros((16, 16), dtype=np.int16)
    px[0, :3] = [-1000, 40, 2000]  # stored = HU with slope 1 intercept 0
    img, _ = read_dicom(write_dicom(tmp_path / "hu.dcm", px, sop=CT, RescaleSlope=1, RescaleIntercept=0,
                                    WindowCenter=40, WindowWidth=400))
    assert img[0, 0] == 0.0 and img[0, 2] == 1.0 and img[0, 1] == pytest.approx(0.50125, abs=1e-4)


def test_resize_area_down_and_bilinear_up(tmp_path):
    px = np.random.default_rng(0).integers(0, 4000, (64, 64)).astype(np.uint16)
    path = write_dicom(tmp_path / "r.dcm", px)
    full, _ = read_dicom(path)
    small, meta = read_dicom(path, size=16)
    assert small.shape == (16, 16) and small.dtype == np.float32
    np.testing.assert_allclose(small, full.reshape(16, 4, 16, 4).mean(axis=(1, 3)), atol=1e-6)
    assert meta["rows"] == 64  # metadata reports the original size
    odd, _ = read_dicom(path, size=20)  # non-integer factor -> torch area
    assert odd.shape == (20, 20)
    assert odd.mean() == pytest.approx(full.mean(), abs=2e-3)
    up, _ = read_dicom(path, size=100)
    assert up.shape == (100, 100) and 0.0 <= up.min() and up.max() <= 1.0


def test_metadata_fields(tmp_path):
    path = write_dicom(tmp_path / "m.dcm", ramp(), Manufacturer="ACME Imaging", ManufacturerModelName="XR-9000",
                       PatientSex="F", PatientAge="045Y", Modality="CR")
    _, meta = read_dicom(path)
    assert meta == {"manufacturer": "ACME Imaging", "scanner_model": "XR-9000", "dicom_sex": "F",
                    "dicom_age": 45.0, "modality": "CR", "rows": 16, "cols": 16}
    _, meta = read_dicom(write_dicom(tmp_path / "infant.dcm", ramp(), PatientAge="006M"))
    assert meta["dicom_age"] == 0.5 and meta["manufacturer"] is None
    assert parse_dicom_age("14D") == pytest.approx(14 / 365.25)
    assert parse_dicom_age("junk") is None


@pytest.mark.parametrize("sop, name", [(RT_PLAN, "RT Plan Storage"), (BASIC_TEXT_SR, "Basic Text SR Storage")])
def test_no_pixel_data_rejected(tmp_path, sop, name):
    path = write_dicom(tmp_path / "x.dcm", None, sop=sop, Modality="RTPLAN")
    with pytest.raises(ImageError, match=rf"no pixel data \(SOP class {name}\)"):
        read_dicom(path)


def test_jpeg2000_junk_rejected_naming_syntax(tmp_path):
    # Pillow provides a JPEG 2000 decoder here, so pydicom tries it and raises RuntimeError on the junk.
    path = write_dicom(tmp_path / "j2k.dcm", None, ts=JPEG2000Lossless, rows_cols=(16, 16),
                       pixel_data=encapsulate([b"not a codestream" * 8]))
    with pytest.raises(ImageError) as err:
        read_dicom(path)
    msg = str(err.value)
    assert "JPEG 2000 Image Compression (Lossless Only)" in msg and "1.2.840.10008.1.2.4.90" in msg
    assert "decoding failed" in msg


def test_compressed_without_decoder_rejected_naming_syntax(tmp_path):
    # JPEG-LS has a plugin now (pyjpegls); video syntaxes have none in pydicom
    with pytest.raises(NotImplementedError):
        pydicom.pixels.get_decoder(MPEG2MPML)
    path = write_dicom(tmp_path / "mpeg2.dcm", None, ts=MPEG2MPML, rows_cols=(16, 16),
                       pixel_data=encapsulate([b"\x00\x00\x01\xb3junk" * 8]))
    with pytest.raises(ImageError, match=r"MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\): "
                                         r"no decoder available"):
        read_dicom(path)


def test_random_bytes_dcm_rejected(tmp_path):
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ImageError, match="not a DICOM file"):
        read_image(path)


def test_dicom_without_preamble_and_suffix_is_read(tmp_path):
    px = ramp()
    ds = Dataset()
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = px.tobytes()
    path = tmp_path / "IM0001"
    ds.save_as(path, implicit_vr=True, little_endian=True)  # bare dataset: no preamble, no 'DICM'
    img, _ = read_image(path)
    assert img.max() == 1.0 and img.min() == 0.0 and img.shape == (16, 16)
    magic = write_dicom(tmp_path / "IM0002", px)  # with 'DICM' but no suffix: dispatch by magic
    np.testing.assert_allclose(read_image(magic)[0], img, atol=1e-6)


def test_multiframe_colour_and_tiny_rejected(tmp_path):
    vol = np.stack([ramp()] * 3)
    with pytest.raises(ImageError, match=r"multi-frame image \(3 frames\)"):
        read_dicom(write_dicom(tmp_path / "vol.dcm", vol, frames=3))
    rgb = np.random.default_rng(2).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    img, _ = read_dicom(write_dicom(tmp_path / "rgb.dcm", rgb, samples=3, photometric="RGB"))  # colour: BT.601 luma
    np.testing.assert_allclose(img, rgb.astype(np.float64) @ [0.299, 0.587, 0.114] / 255.0, atol=1e-5)
    grey = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None], 3, axis=2)
    img, _ = read_dicom(write_dicom(tmp_path / "grey_rgb.dcm", grey, samples=3, photometric="RGB"))
    np.testing.assert_allclose(img, np.arange(256).reshape(16, 16) / 255.0, atol=1e-6)
    with pytest.raises(ImageError, match=r"too small \(4x16"):
        read_dicom(write_dicom(tmp_path / "tiny.dcm", ramp(4, 16)))


# -------------------------------------------------------------------------------------------------------- PNG / npz


def test_png_8bit_and_16bit(tmp_path):
    a8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(a8).save(tmp_path / "a.png")
    img, meta = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(img, a8 / 255.0, atol=1e-7)
    assert meta["rows"] == 16 and meta["manufacturer"] is None
    a16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    a16[0, 0] = 1000
    Image.fromarray(a16).save(tmp_path / "b.png")
    img16, _ = read_image(tmp_path / "b.png", size=8)
    assert img16.shape == (8, 8)
    full16, _ = read_image(tmp_path / "b.png")
    assert full16[0, 0] == pytest.approx(1000 / 65535, abs=1e-7)
    assert full16[15, 15] == 1.0


def test_png_colour_rejected_grey_rgb_accepted(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(ImageError, match="colour image, expected grayscale"):
        read_image(tmp_path / "c.png")
    grey = np.repeat(rgb[..., :1], 3, axis=2)
    Image.fromarray(grey).save(tmp_path / "g.png")
    img, _ = read_image(tmp_path / "g.png")
    np.testing.assert_allclose(img, rgb[..., 0] / 255.0, atol=1e-6)


def test_jpeg_grey_and_rgb_encoded_grey_accepted(tmp_path):
    grey = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "rgb.jpeg", quality=95)
    g, _ = read_image(tmp_path / "g.jpg")
    rgb, _ = read_image(tmp_path / "rgb.jpeg")  # lossy chroma noise stays within the grey tolerance
    assert np.abs(g - grey / 255.0).max() < 0.03 and np.abs(rgb - grey / 255.0).max() < 0.03


def test_load_npz_medmnist(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {f"{s}_images": rng.integers(0, 256, (n, 28, 28)).astype(np.uint8) for s, n in
              [("train", 5), ("val", 2), ("test", 3)]}
    arrays.update({f"{s}_labels": rng.integers(0, 2, (n, 1)) for s, n in [("train", 5), ("val", 2), ("test", 3)]})
    np.savez(tmp_path / "m.npz", **arrays)
    x, y = load_npz(tmp_path / "m.npz", "val")
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32 and y.shape == (2,) and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0], arrays["val_images"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, arrays["val_labels"][:, 0])
    with pytest.raises(ValueError, match=r"split 'dev'.*keys present: test_images, test_labels, train_images"):
        load_npz(tmp_path / "m.npz", "dev")
    np.savez(tmp_path / "c.npz", train_images=rng.integers(0, 256, (2, 28, 28, 3)).astype(np.uint8),
             train_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match="colour"):
        load_npz(tmp_path / "c.npz")
    grey = arrays["test_images"]
    np.savez(tmp_path / "g.npz", test_images=np.repeat(grey[..., None], 3, axis=3), test_labels=arrays["test_labels"])
    xg, _ = load_npz(tmp_path / "g.npz", "test")
    np.testing.assert_allclose(xg[:, 0], grey / 255.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- manifest


def make_site(tmp_path, n=4, extra_rows=()):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        px = ramp(top=1000 + 500 * i)
        px[0, 0] = 7 * i
        write_dicom(site / "img" / f"{i}.dcm", px, Manufacturer=f"M{i % 2}", PatientAge=f"0{40 + i}Y",
                    PatientSex="MF"[i % 2])
        rows.append([f"00{i}", f"img/{i}.dcm", i % 2, "F" if i % 2 else "M"])
    write_manifest(site / "manifest.csv", rows + list(extra_rows),
                   header=("patient_id", "image_path", "label", "sex"))
    return site


def test_manifest_missing_columns_named(tmp_path):
    write_manifest(tmp_path / "manifest.csv", [["1"]], header=("patient_id",))
    with pytest.raises(ManifestError, match=r"manifest\.csv lacks required column\(s\) image_path, label"):
        read_manifest(tmp_path / "manifest.csv")
    with pytest.raises(ManifestError, match="manifest not found"):
        load_site(tmp_path / "nowhere")


def test_bad_labels_and_missing_file_rejected_run_continues(tmp_path):
    site = make_site(tmp_path, n=2, extra_rows=[
        ["010", "img/0.dcm", "abc", "M"],   # row 2
        ["011", "img/0.dcm", "", "M"],      # row 3
        ["012", "img/0.dcm", "2", "M"],     # row 4: out of range for 2 classes
        ["013", "img/0.dcm", "1.5", "M"],   # row 5
        ["014", "img/gone.dcm", "1", "M"],  # row 6
        ["015", "img/1.dcm", "1.0", "F"],   # row 7: accepted
    ])
    df, rej = read_manifest(site / "manifest.csv")
    assert list(df.index) == [0, 1, 7]
    assert df["patient_id"].tolist() == ["000", "001", "015"]  # leading zeros kept
    assert df["label"].dtype == np.int64 and df["label"].tolist() == [0, 1, 1]
    by_row = {r.row: r.reason for r in rej}
    assert set(by_row) == {2, 3, 4, 5, 6}
    assert "'abc'" in by_row[2] and "missing label" == by_row[3]
    assert "'2'" in by_row[4] and "out of range [0, 2)" in by_row[4] and "'1.5'" in by_row[5]
    assert "image file not found" in by_row[6] and rej[-1].image_path == "img/gone.dcm"
    _, rej3 = read_manifest(site / "manifest.csv", num_classes=3)
    assert {r.row for r in rej3} == {2, 3, 5, 6}

    sd = load_site(site, image_size=8, cache=False)
    assert sd.images.shape == (3, 1, 8, 8) and sd.images.dtype == np.float32
    assert sd.labels.tolist() == [0, 1, 1] and sd.labels.dtype == np.int64
    assert [r.row for r in sd.rejected] == [2, 3, 4, 5, 6]
    assert list(sd.frame.index) == [0, 1, 2]
    assert sd.frame["sex"].tolist() == ["M", "F", "F"]
    assert sd.frame["manufacturer"].tolist() == ["M0", "M1", "M1"]
    assert sd.frame["dicom_age"].tolist() == [40.0, 41.0, 41.0]
    assert sd.frame["dicom_sex"].tolist() == ["M", "F", "F"]
    assert sd.frame["rows"].tolist() == [16, 16, 16]


def test_undecodable_image_becomes_rejection(tmp_path):
    site = make_site(tmp_path, n=2, extra_rows=[["099", "img/noise.dcm", "1", "F"]])
    (site / "img" / "noise.dcm").write_bytes(b"\x00" * 10 + b"junk" * 100)
    sd = load_site(site, image_size=8, cache=False)
    assert len(sd.labels) == 2
    assert [(r.row, r.image_path) for r in sd.rejected] == [(2, "img/noise.dcm")]
    assert "not a DICOM file" in sd.rejected[0].reason


def test_empty_site_raises(tmp_path):
    write_manifest(tmp_path / "manifest.csv", [])
    with pytest.raises(ManifestError, match="no usable images .*manifest has no rows"):
        load_site(tmp_path)
    write_manifest(tmp_path / "manifest.csv", [["1", "a.dcm", "0"], ["2", "b.dcm", "7"]])
    with pytest.raises(ManifestError, match=r"no usable images in .*: 2 rows, all rejected; first reasons: .*row 0"):
        load_site(tmp_path)
    (tmp_path / "a.dcm").write_bytes(b"junk")
    with pytest.raises(ManifestError, match="not a DICOM file"):  # decode-time rejections count too
        load_site(tmp_path, cache=False)


def test_write_rejected_csv(tmp_path):
    out = tmp_path / "out" / "rejected.csv"
    write_rejected([Rejection("a.dcm", 3, "bad label 'x', really"), Rejection("b.png", None, "why")], out)
    assert out.read_text().splitlines() == ["image_path,row,reason", "a.dcm,3,\"bad label 'x', really\"", "b.png,,why"]
    back = pd.read_csv(out)
    assert back["reason"][0] == "bad label 'x', really"
    write_rejected([], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text() == "image_path,row,reason\n"


# ------------------------------------------------------------------------------------------------------------- cache


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = data_site.read_image

    def counting(path, size=None):
        calls.append(str(path))
        return real(path, size)

    monkeypatch.setattr(data_site, "read_image", counting)
    return calls


def test_cache_hit_decodes_nothing_and_matches(tmp_path, count_decodes):
    site = make_site(tmp_path, n=4, extra_rows=[["050", "img/bad.dcm", "1", "F"], ["051", "img/0.dcm", "9", "F"]])
    (site / "img" / "bad.dcm").write_bytes(b"junk" * 50)
    first = load_site(site, image_size=8)
    assert len(count_decodes) == 5
    caches = list((site / ".equifed_cache").glob("*.npz"))
    assert len(caches) == 1
    second = load_site(site, image_size=8)
    assert len(count_decodes) == 5  # nothing decoded on the hit
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    pd.testing.assert_frame_equal(first.frame, second.frame)
    assert first.rejected == second.rejected and [r.row for r in second.rejected] == [4, 5]
    uncached = load_site(site, image_size=8, cache=False)  # same numbers with or without the cache
    np.testing.assert_array_equal(uncached.images, second.images)
    pd.testing.assert_frame_equal(uncached.frame, second.frame)
    exact, _ = read_dicom(site / "img" / "2.dcm", 8)
    np.testing.assert_allclose(second.images[2, 0], exact, atol=1e-5)
    load_site(site, image_size=16)  # another size is another cache entry
    assert len(list((site / ".equifed_cache").glob("*.npz"))) == 2


def test_cache_invalidated_by_touch_and_manifest_edit(tmp_path, count_decodes):
    site = make_site(tmp_path, n=3)
    load_site(site, image_size=8)
    assert len(count_decodes) == 3
    img = site / "img" / "1.dcm"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    load_site(site, image_size=8)
    assert len(count_decodes) == 6
    load_site(site, image_size=8)
    assert len(count_decodes) == 6
    text = (site / "manifest.csv").read_text()
    (site / "manifest.csv").write_text(text.replace("002,img/2.dcm,0", "002,img/2.dcm,1"))
    edited = load_site(site, image_size=8)
    assert len(count_decodes) == 9
    assert edited.labels.tolist() == [0, 1, 1]
    assert len(list((site / ".equifed_cache").glob("*.npz"))) == 1  # the stale entry was replaced


def test_cache_write_failure_and_corrupt_cache(tmp_path, count_decodes, monkeypatch):
    site = make_site(tmp_path, n=2)

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        sd = load_site(site, image_size=8)
    assert sd.images.shape == (2, 1, 8, 8) and not list((site / ".equifed_cache").glob("*"))
    good = load_site(site, image_size=8)
    np.testing.assert_array_equal(good.images, sd.images)
    (cache_file,) = (site / ".equifed_cache").glob("*.npz")
    cache_file.write_bytes(b"torn write")
    again = load_site(site, image_size=8)
    assert len(count_decodes) == 6
    np.testing.assert_array_equal(again.images, sd.images)
    load_site(site, image_size=8, cache=False)
    assert len(count_decodes) == 8


def test_transient_failure_is_not_cached(tmp_path, monkeypatch):
    site = make_site(tmp_path, n=2)
    real = data_site.read_image

    def denied(path, size=None):
        if str(path).endswith("1.dcm"):
            raise ImageError("cannot open file: permission denied") from PermissionError(13, "denied")
        return real(path, size)

    monkeypatch.setattr(data_site, "read_image", denied)
    sd = load_site(site, image_size=8)
    assert len(sd.labels) == 1 and sd.rejected[0].row == 1 and "permission denied" in sd.rejected[0].reason
    assert not list((site / ".equifed_cache").glob("*.npz"))  # fixing permissions changes no mtime
    monkeypatch.setattr(data_site, "read_image", real)
    assert len(load_site(site, image_size=8).labels) == 2


def test_mixed_site_png_dicom_absolute_path_and_manifest_metadata_wins(tmp_path):
    site = tmp_path / "mixed"
    site.mkdir()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(site / "a.png")
    dcm = write_dicom(site / "elsewhere.dcm", ramp(), Manufacturer="FromDicom", PatientAge="070Y")  # absolute, inside
    rows = [["1", "a.png", "0", "", "north"], ["2", str(dcm), "1", "FromManifest", "01"]]
    write_manifest(site / "manifest.csv", rows, header=("patient_id", "image_path", "label", "manufacturer", "site"))
    sd = load_site(site, image_size=8)
    assert pd.isna(sd.frame["manufacturer"][0]) and sd.frame["manufacturer"][1] == "FromManifest"
    assert sd.frame["site"].tolist() == ["north", "01"]  # read as text
    assert np.isnan(sd.frame["dicom_age"][0]) and sd.frame["dicom_age"][1] == 70.0
    assert sd.frame["rows"].tolist() == [16, 16] and sd.frame["rows"].dtype == np.int64
    assert sd.images.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(sd.images[0, 0], (np.arange(256).reshape(8, 2, 8, 2).mean(axis=(1, 3)) / 255.0),
                               atol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        load_site(site, image_size=0)


# ------------------------------------------------------------------------------------------------ unlabelled rows


def make_unlabelled_site(tmp_path, n_labelled=6, n_unlabelled=4, corrupt=True, seed=0):
    """PNG site: n_labelled rows with labels, n_unlabelled with an empty (or blank) label cell and, if corrupt, one
    more unlabelled row whose file is not an image."""
    rng = np.random.default_rng(seed)
    site = tmp_path / "unl"
    (site / "img").mkdir(parents=True)
    rows = []
    for i in range(n_labelled + n_unlabelled):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(site / "img" / f"{i}.png")
        label = str(i % 2) if i < n_labelled else ("" if i % 2 else "  ")  # empty and blank cells
        rows.append([f"P{i:03d}", f"img/{i}.png", label])
    if corrupt:
        (site / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 40)
        rows.append(["P999", "img/corrupt.png", ""])
    write_manifest(site / "manifest.csv", rows)
    return site


def test_unlabelled_rows_rejected_by_default_kept_on_request(tmp_path):
    site = make_unlabelled_site(tmp_path)
    sd = load_site(site, image_size=8, cache=False)
    assert sd.images.shape == (6, 1, 8, 8) and sd.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert [(r.row, r.reason) for r in sd.rejected] == [(row, "missing label") for row in range(6, 11)]
    assert sd.unlabelled.shape == (0, 1, 8, 8) and sd.unlabelled.dtype == np.float32 and sd.unlabelled_frame.empty

    su = load_site(site, image_size=8, cache=False, unlabelled=True)
    np.testing.assert_array_equal(su.images, sd.images)
    np.testing.assert_array_equal(su.labels, sd.labels)
    pd.testing.assert_frame_equal(su.frame, sd.frame)
    assert su.unlabelled.shape == (4, 1, 8, 8) and su.unlabelled.dtype == np.float32
    assert su.unlabelled_frame["patient_id"].tolist() == ["P006", "P007", "P008", "P009"]
    assert su.unlabelled_frame["image_path"].tolist() == [f"img/{i}.png" for i in range(6, 10)]
    assert list(su.unlabelled_frame.index) == [0, 1, 2, 3] and "label" not in su.unlabelled_frame.columns
    assert set(META_COLUMNS) <= set(su.unlabelled_frame.columns)
    assert su.unlabelled_frame["rows"].tolist() == [16] * 4
    (rej,) = su.rejected
    assert rej.row == 10 and rej.image_path == "img/corrupt.png" and rej.reason.startswith("unreadable image file")

    # each unlabelled image is exactly what a labelled load of the same file gives
    rows = [[f"P{i:03d}", f"img/{i}.png", "1"] for i in range(6, 10)] + [["P999", "img/corrupt.png", "1"]]
    write_manifest(site / "labelled.csv", rows)
    as_labelled = load_site(site, image_size=8, manifest="labelled.csv", cache=False)
    np.testing.assert_array_equal(su.unlabelled, as_labelled.images)
    assert [(r.row, r.reason) for r in as_labelled.rejected] == [(4, rej.reason)]  # same decode reason


def test_unlabelled_keeps_rejecting_bad_labels_and_bad_paths(tmp_path):
    site = make_unlabelled_site(tmp_path, n_labelled=2, n_unlabelled=1, corrupt=False)
    with open(site / "manifest.csv", "a", newline="") as f:
        csv.writer(f).writerows([["X1", "img/0.png", "abc"], ["X2", "img/0.png", "5"], ["X3", "img/gone.png", ""],
                                 ["", "img/1.png", ""], ["X5", "../outside.png", ""]])
    su = load_site(site, image_size=8, cache=False, unlabelled=True)
    assert len(su.labels) == 2 and len(su.unlabelled) == 1
    by_row = {r.row: r.reason for r in su.rejected}
    assert set(by_row) == {3, 4, 5, 6, 7}
    assert "'abc'" in by_row[3] and "out of range" in by_row[4] and "image file not found" in by_row[5]
    assert by_row[6] == "missing patient_id" and "missing label" not in by_row.values()


def test_unlabelled_cache_never_crosses_and_hits(tmp_path, count_decodes):
    site = make_unlabelled_site(tmp_path)
    plain = load_site(site, image_size=8)
    assert len(count_decodes) == 6 and len(plain.labels) == 6 and len(plain.unlabelled) == 0
    assert sum(r.reason == "missing label" for r in plain.rejected) == 5
    with_u = load_site(site, image_size=8, unlabelled=True)  # not served the labelled-only entry
    assert len(count_decodes) == 6 + 11
    assert len(with_u.labels) == 6 and len(with_u.unlabelled) == 4 and [r.row for r in with_u.rejected] == [10]
    again = load_site(site, image_size=8)  # its own entry survived the other load's save
    assert len(count_decodes) == 17
    assert len(again.labels) == 6 and len(again.unlabelled) == 0 and len(again.rejected) == 5
    np.testing.assert_array_equal(again.images, plain.images)
    hit = load_site(site, image_size=8, unlabelled=True)  # second unlabelled load: from the cache
    assert len(count_decodes) == 17
    np.testing.assert_array_equal(hit.images, with_u.images)
    np.testing.assert_array_equal(hit.unlabelled, with_u.unlabelled)
    pd.testing.assert_frame_equal(hit.unlabelled_frame, with_u.unlabelled_frame)
    pd.testing.assert_frame_equal(hit.frame, with_u.frame)
    assert hit.rejected == with_u.rejected
    assert len(list((site / ".equifed_cache").glob("*.npz"))) == 2
    fresh = load_site(site, image_size=8, unlabelled=True, cache=False)
    np.testing.assert_array_equal(fresh.unlabelled, hit.unlabelled)


def test_unlabelled_cache_other_order(tmp_path, count_decodes):
    site = make_unlabelled_site(tmp_path)
    assert len(load_site(site, image_size=8, unlabelled=True).unlabelled) == 4
    plain = load_site(site, image_size=8)
    assert len(plain.labels) == 6 and len(plain.unlabelled) == 0 and len(plain.rejected) == 5
    assert len(count_decodes) == 11 + 6
    assert len(load_site(site, image_size=8, unlabelled=True).unlabelled) == 4
    assert len(load_site(site, image_size=8).rejected) == 5
    assert len(count_decodes) == 17  # both from their own entries


def test_all_unlabelled_site(tmp_path, count_decodes):
    site = make_unlabelled_site(tmp_path, n_labelled=0, n_unlabelled=5, corrupt=False)
    with pytest.raises(ManifestError, match=r"no usable images .*5 rows, all rejected; .*missing label"):
        load_site(site, image_size=8)
    su = load_site(site, image_size=8, unlabelled=True)
    assert su.images.shape == (0, 1, 8, 8) and su.labels.shape == (0,) and su.labels.dtype == np.int64
    assert su.frame.empty and {"patient_id", "label", *META_COLUMNS} <= set(su.frame.columns)
    assert su.unlabelled.shape == (5, 1, 8, 8) and len(su.unlabelled_frame) == 5 and su.rejected == []
    again = load_site(site, image_size=8, unlabelled=True)
    assert len(count_decodes) == 5  # cached too
    np.testing.assert_array_equal(again.unlabelled, su.unlabelled)
    (site / "img" / "0.png").write_bytes(b"junk")  # only unlabelled rows, none decodable: still an error
    write_manifest(site / "manifest.csv", [["P0", "img/0.png", ""]])
    with pytest.raises(ManifestError, match="no usable images"):
        load_site(site, image_size=8, unlabelled=True)


def test_site_data_defaults_for_existing_constructions():
    sd = SiteData(images=np.zeros((3, 1, 8, 8), np.float32), labels=np.zeros(3, np.int64),
                  frame=pd.DataFrame({"label": [0, 0, 0]}), rejected=[])
    assert sd.unlabelled.shape == (0, 1, 8, 8) and sd.unlabelled.dtype == np.float32
    assert isinstance(sd.unlabelled_frame, pd.DataFrame) and sd.unlabelled_frame.empty
    other = SiteData(images=np.zeros((1, 1, 4, 4), np.float32), labels=np.zeros(1, np.int64),
                     frame=pd.DataFrame(), rejected=[])
    assert other.unlabelled_frame is not sd.unlabelled_frame
