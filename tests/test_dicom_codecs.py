"""DICOM as hospitals export it: compressed transfer syntaxes through pydicom's plugins, colour to luminance,
multi-frame by the site's setting, size checks on compressed data, and pydicom's own bundled test corpus through
`equifed-client check`.

Every compressed file is written here: RLE by pydicom itself, JPEG-LS by pyjpegls, JPEG 2000 by pylibjpeg-openjpeg,
JPEG Lossless by the small encoder below (nothing installed here encodes it), baseline JPEG by Pillow.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MPEG2MPML,
    RLELossless,
    generate_uid,
)

from client.policy import PolicyError, SitePolicy
from core_models.data import ImageError, ImageLimits, load_site, read_dicom

REPO = Path(__file__).resolve().parents[1]
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: how colour exports usually arrive
BT601 = np.array([0.299, 0.587, 0.114])
HUGE = 60000


def dicom(path, pixels, *, photometric="MONOCHROME2", bits_stored=None, ts=None, plugin="", frames=None,
          write_ts=None, pixel_data=None, window=None, **compress_kw):
    """Write `pixels` ((H, W), (H, W, 3) or (F, H, W)) as a DICOM file, compressed to `ts` by pydicom's encoder
    `plugin` if given; `pixel_data` (with write_ts) stores already-encoded frames instead."""
    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = write_ts or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SC, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "P1", "OT"
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if frames:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if ts is not None:
        ds.compress(ts, encoding_plugin=plugin, **compress_kw)
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_lossless(img: np.ndarray, precision: int) -> bytes:
    """A JPEG Lossless codestream (process 14, first-order prediction, selection value 1) of a 2-D unsigned image:
    one component, one Huffman table giving each of the 17 difference categories the 5-bit code of its number."""
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]  # first row: the left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the one above
    pred[1:, 1:] = x[1:, :-1]  # predictor 1: left
    d = ((x - pred + 32768) % 65536 - 32768).ravel()  # differences are modulo 2^16
    cat = np.frexp(np.abs(d).astype(np.float64))[1].astype(np.int64)  # bits of |d| (0 for 0; 16 for -32768)
    nextra = np.where(cat == 16, 0, cat)
    extra = np.where(d >= 0, d, d + (1 << nextra) - 1) & ((1 << nextra) - 1)
    code, length = (cat << nextra) | extra, 5 + nextra
    starts = np.cumsum(length) - length
    bits = np.ones(-(-int(length.sum()) // 8) * 8, dtype=np.uint8)  # padded with 1-bits
    for k in range(int(length.max())):
        on = length > k
        bits[starts[on] + k] = (code[on] >> (length[on] - 1 - k)) & 1
    scan = np.packbits(bits)
    scan = np.insert(scan, np.flatnonzero(scan == 0xFF) + 1, 0)  # byte stuffing
    h, w = img.shape
    sof = b"\xff\xc3" + struct.pack(">HBHHB", 11, precision, h, w, 1) + bytes([1, 0x11, 0])
    dht = b"\xff\xc4" + struct.pack(">HB", 36, 0) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0, 1, 0, 0)
    return b"\xff\xd8" + sof + dht + sos + scan.tobytes() + b"\xff\xd9"


def radiograph(rng, h=48, w=64, bits=12):
    """A non-square 12-bit field with noise: rows and columns swapped, or a lossy decode, would show."""
    yy, xx = np.mgrid[0:h, 0:w]
    field = 1800 + 1400 * np.sin(xx / 9.0) * np.cos(yy / 7.0) + rng.normal(0, 60, (h, w))
    return np.clip(field, 0, 2**bits - 1).astype(np.uint16)


def colour_picture(rng, h=48, w=64):
    """Smooth RGB (what lossy JPEG keeps well) with every channel different."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([200 * xx + 30, 220 * yy + 10, 120 + 100 * np.sin(6 * xx * yy)], axis=-1)
    return np.clip(rgb + rng.normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- grey, compressed

LOSSLESS = [(RLELossless, "pydicom"), (JPEGLSLossless, "pyjpegls"), (JPEG2000Lossless, "pylibjpeg"),
            (JPEGLosslessSV1, None), (JPEGLossless, None)]


@pytest.mark.parametrize("ts, plugin", LOSSLESS, ids=[t.name for t, _ in LOSSLESS])
def test_lossless_syntax_decodes_as_the_uncompressed_file(tmp_path, ts, plugin):
    px = radiograph(np.random.default_rng(1))
    plain, _ = read_dicom(dicom(tmp_path / "plain.dcm", px, bits_stored=12))
    expected = (px - px.min()) / float(px.max() - px.min())  # no VOI: min-max of the stored values
    np.testing.assert_allclose(plain, expected, atol=1e-6)
    if plugin is None:
        path = dicom(tmp_path / "c.dcm", px, bits_stored=12, write_ts=ts,
                     pixel_data=encapsulate([jpeg_lossless(px, 12)]))
    else:
        path = dicom(tmp_path / "c.dcm", px, bits_stored=12, ts=ts, plugin=plugin)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ts
    img, meta = read_dicom(path)
    assert (meta["rows"], meta["cols"]) == (48, 64)
    np.testing.assert_array_equal(img, plain)


def test_jpeg_lossless_16_bit_full_range(tmp_path):
    # 16-bit differences wrap modulo 2^16, and category 16 has no extra bits: the hardest case of the syntax
    px = np.random.default_rng(2).integers(0, 65536, (16, 24)).astype(np.uint16)
    px[0, :3] = (0, 65535, 32767)  # differences -1 and -32768 (== 32768 mod 2^16: category 16)
    path = dicom(tmp_path / "c.dcm", px, write_ts=JPEGLosslessSV1, pixel_data=encapsulate([jpeg_lossless(px, 16)]))
    np.testing.assert_array_equal(read_dicom(path)[0], read_dicom(dicom(tmp_path / "p.dcm", px))[0])


def test_near_lossless_and_lossy_syntaxes_stay_close(tmp_path):
    px = radiograph(np.random.default_rng(3))
    window = (2048, 4096)  # a fixed display range: the lossy decode's own min and max do not move the scale
    plain, _ = read_dicom(dicom(tmp_path / "plain.dcm", px, bits_stored=12, window=window))
    jls, _ = read_dicom(dicom(tmp_path / "jls.dcm", px, bits_stored=12, window=window, ts=JPEGLSNearLossless,
                              plugin="pyjpegls", jls_error=3))
    assert 0 < np.abs(jls - plain).max() <= 3 / 4095 + 1e-6  # JPEG-LS bounds every pixel's error
    j2k, _ = read_dicom(dicom(tmp_path / "j2k.dcm", px, bits_stored=12, window=window, ts=JPEG2000,
                              plugin="pylibjpeg", j2k_cr=[8]))
    err = np.abs(j2k - plain)
    assert 0 < err.mean() < 0.01 and err.max() < 0.1, (err.mean(), err.max())


def test_bundled_lossless_variants_of_one_image_decode_alike():
    base, _ = read_dicom(pydicom.data.get_testdata_file("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"):
        np.testing.assert_array_equal(read_dicom(pydicom.data.get_testdata_file(name))[0], base, err_msg=name)


# ------------------------------------------------------------------------------------------------------ colour


COLOUR_LOSSLESS = [(None, ""), (RLELossless, "pydicom"), (JPEGLSLossless, "pyjpegls"),
                   (JPEG2000Lossless, "pylibjpeg")]


@pytest.mark.parametrize("ts, plugin", COLOUR_LOSSLESS, ids=["native"] + [t.name for t, _ in COLOUR_LOSSLESS[1:]])
def test_rgb_becomes_bt601_luminance(tmp_path, ts, plugin):
    rgb = colour_picture(np.random.default_rng(4))
    img, _ = read_dicom(dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", ts=ts, plugin=plugin))
    np.testing.assert_allclose(img, rgb.astype(np.float64) @ BT601 / 255.0, atol=1e-5)


def test_16_bit_rgb_scales_by_its_stored_range(tmp_path):
    rgb = (colour_picture(np.random.default_rng(5)).astype(np.uint16) * 16)  # 12 bits stored in 16
    img, _ = read_dicom(dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=12, ts=RLELossless))
    np.testing.assert_allclose(img, rgb.astype(np.float64) @ BT601 / 4095.0, atol=1e-5)


def test_ybr_full_gives_its_y_channel_which_is_the_rgb_luminance(tmp_path):
    rgb = colour_picture(np.random.default_rng(6))
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    img, _ = read_dicom(dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))
    np.testing.assert_allclose(img, ybr[..., 0] / 255.0, atol=1e-6)
    from_rgb, _ = read_dicom(dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert np.abs(img - from_rgb).max() <= 0.5 / 255 + 1e-6  # the same luma, rounded to 8 bits once


def test_ybr_full_422_native_and_as_baseline_jpeg(tmp_path):
    rgb = colour_picture(np.random.default_rng(7))
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    # native 4:2:2: Y0 Y1 Cb Cr per pixel pair
    packed = np.stack([ybr[:, 0::2, 0], ybr[:, 1::2, 0], ybr[:, 0::2, 1], ybr[:, 0::2, 2]], axis=-1)
    native, _ = read_dicom(dicom(tmp_path / "422.dcm", ybr, photometric="YBR_FULL_422", pixel_data=packed.tobytes()))
    np.testing.assert_allclose(native, ybr[..., 0] / 255.0, atol=1e-6)  # Y is not subsampled
    # a colour secondary capture as PACS export it: baseline JPEG, 4:2:2 chroma
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=1)
    jpeg, _ = read_dicom(dicom(tmp_path / "jpeg.dcm", rgb, photometric="YBR_FULL_422", write_ts=JPEGBaseline8Bit,
                               pixel_data=encapsulate([buf.getvalue()])))
    err = np.abs(jpeg - rgb.astype(np.float64) @ BT601 / 255.0)
    assert err.mean() < 0.005 and err.max() < 0.03, (err.mean(), err.max())


def test_palette_colour_becomes_the_luminance_of_its_lut(tmp_path):
    rng = np.random.default_rng(8)
    lut = rng.integers(0, 65536, (256, 3)).astype(np.uint16)
    index = rng.integers(0, 256, (24, 32)).astype(np.uint8)
    path = tmp_path / "pal.dcm"
    dicom(path, index, photometric="PALETTE COLOR")
    ds = pydicom.dcmread(path)
    for i in range(3):  # red, green, blue: descriptor (entries, first index, bits), then the table
        ds.add_new(0x00281101 + i, "US", [256, 0, 16])
        ds.add_new(0x00281201 + i, "OW", lut[:, i].tobytes())
    ds.save_as(path)
    img, _ = read_dicom(path)
    np.testing.assert_allclose(img, (lut.astype(np.float64) @ BT601 / 65535.0)[index], atol=1e-5)


# ------------------------------------------------------------------------------------------------- multi-frame


@pytest.mark.parametrize("ts, plugin", [(None, ""), (RLELossless, "pydicom"), (JPEG2000Lossless, "pylibjpeg")],
                         ids=["native", "rle", "j2k"])
def test_multi_frame_rejected_by_default_first_frame_on_request(tmp_path, ts, plugin):
    rng = np.random.default_rng(9)
    vol = np.stack([radiograph(rng, 32, 40) for _ in range(3)])  # openjpeg's default 6 levels need 32 px
    path = dicom(tmp_path / "vol.dcm", vol, bits_stored=12, frames=3, ts=ts, plugin=plugin)
    with pytest.raises(ImageError, match=r'multi-frame image \(3 frames\).*multi-frame = "first"'):
        read_dicom(path)
    first, _ = read_dicom(path, limits=ImageLimits(multi_frame="first"))
    np.testing.assert_array_equal(first, read_dicom(dicom(tmp_path / "f0.dcm", vol[0], bits_stored=12))[0])
    # only the first frame is decoded, so the pixel cap is one frame's
    read_dicom(path, limits=ImageLimits(max_pixels=32 * 40, multi_frame="first"))
    with pytest.raises(ImageError, match=r"image too large: 32 x 40 pixels \(limit 1,279"):
        read_dicom(path, limits=ImageLimits(max_pixels=32 * 40 - 1, multi_frame="first"))


def test_multi_frame_site_setting_reaches_the_decoder(tmp_path):
    rng = np.random.default_rng(10)
    site = tmp_path / "site"
    site.mkdir()
    dicom(site / "vol.dcm", np.stack([radiograph(rng, 16, 16)] * 2), bits_stored=12, frames=2, ts=RLELossless)
    dicom(site / "one.dcm", radiograph(rng, 16, 16), bits_stored=12)
    (site / "manifest.csv").write_text("patient_id,image_path,label\np1,vol.dcm,0\np2,one.dcm,1\n")

    def load(node_config=None):
        return load_site(site, image_size=8, limits=SitePolicy.load(site, node_config).image_limits())

    default = load()  # default "reject"; cached with that setting
    assert default.frame["image_path"].tolist() == ["one.dcm"]
    assert "multi-frame image (2 frames)" in default.rejected[0].reason
    (site / "site.toml").write_text('multi-frame = "first"\n')
    assert SitePolicy.load(site).image_limits().multi_frame == "first"
    assert load().frame["image_path"].tolist() == ["vol.dcm", "one.dcm"]  # not served from the "reject" cache
    assert len(load({"multi-frame": "reject"}).rejected) == 1  # the stricter source wins
    (site / "site.toml").write_text('multi-frame = "all"\n')
    with pytest.raises(PolicyError, match="multi-frame must be one of"):
        SitePolicy.load(site)
    with pytest.raises(ValueError, match="multi_frame"):
        ImageLimits(multi_frame="all")


# --------------------------------------------------------------------------------------------- hostile input


def measured(fn, *args, **kwargs):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        out = e
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak


def _bomb(frame: bytes, ts) -> bytes:
    """The frame with its codestream header claiming HUGE x HUGE pixels."""
    if ts == JPEG2000Lossless:
        i = frame.index(b"\xff\x4f\xff\x51")
        return frame[: i + 8] + struct.pack(">4I", HUGE, HUGE, 0, 0) + frame[i + 24 :]
    i = frame.index(b"\xff\xf7" if ts == JPEGLSLossless else b"\xff\xc3")
    return frame[: i + 5] + struct.pack(">HH", HUGE, HUGE) + frame[i + 9 :]


@pytest.mark.parametrize("ts", [JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1], ids=lambda t: t.name)
def test_codestream_claiming_a_huge_image_refused_undecoded(tmp_path, ts):
    px = radiograph(np.random.default_rng(11), 32, 32)
    if ts == JPEGLosslessSV1:
        frame = jpeg_lossless(px, 12)
    else:
        plugin = "pylibjpeg" if ts == JPEG2000Lossless else "pyjpegls"
        ds = pydicom.dcmread(dicom(tmp_path / "ok.dcm", px, bits_stored=12, ts=ts, plugin=plugin))
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    path = dicom(tmp_path / "bomb.dcm", px, bits_stored=12, write_ts=ts, pixel_data=encapsulate([_bomb(frame, ts)]))
    out, seconds, peak = measured(read_dicom, path, 8)
    assert isinstance(out, ImageError), out
    assert f"codestream is {HUGE} x {HUGE} pixels but the DICOM header says 32 x 32; refused undecoded" in str(out)
    assert peak < 64 * 1024**2, (seconds, peak)  # decoding it would take HUGE**2 samples
    intact = dicom(tmp_path / "intact.dcm", px, bits_stored=12, write_ts=ts, pixel_data=encapsulate([frame]))
    assert read_dicom(intact, 8)[0].shape == (8, 8)  # the same file with its true header decodes


def test_deflated_dataset_inflating_past_the_file_cap_refused(tmp_path):
    px = np.zeros((256, 256), dtype=np.uint16)
    px[100:150, 80:200] = 4000
    path = dicom(tmp_path / "dfl.dcm", px, write_ts=DeflatedExplicitVRLittleEndian)
    assert path.stat().st_size < 4096  # 128 kB of pixels inflate from a few hundred bytes
    with pytest.raises(ImageError, match=r"deflated dataset too large: inflates to over 0\.1 MiB"):
        read_dicom(path, limits=ImageLimits(max_file_bytes=100 * 1024))
    img, _ = read_dicom(path)
    np.testing.assert_array_equal(img, read_dicom(dicom(tmp_path / "plain.dcm", px))[0])


def test_syntax_without_decoder_is_not_cached(tmp_path):
    # installing a plugin later must take effect without the files changing: such a rejection is never cached
    site = tmp_path / "site"
    site.mkdir()
    dicom(site / "ok.dcm", radiograph(np.random.default_rng(12), 16, 16), bits_stored=12)
    dicom(site / "video.dcm", np.zeros((16, 16), np.uint8), write_ts=MPEG2MPML,
          pixel_data=encapsulate([b"\x00\x00\x01\xb3" * 8]))
    (site / "manifest.csv").write_text("patient_id,image_path,label\np1,ok.dcm,0\np2,video.dcm,1\n")
    sd = load_site(site, image_size=8)
    assert "no decoder available" in sd.rejected[0].reason and len(sd.labels) == 1
    assert not list((site / ".equifed_cache").glob("*.npz"))
    (site / "video.dcm").unlink()
    (site / "manifest.csv").write_text("patient_id,image_path,label\np1,ok.dcm,0\n")
    load_site(site, image_size=8)
    assert len(list((site / ".equifed_cache").glob("*.npz"))) == 1  # without it the site is cached as before


# ------------------------------------------------------------------------------------- pydicom's test corpus


def test_pydicom_corpus_through_equifed_client_check(tmp_path):
    """Every bundled file is accepted or rejected with a reason, and nothing pydicom handled prints a traceback."""
    base = Path(pydicom.data.__file__).parent
    # the files installed with pydicom (not any downloaded to this user's cache)
    files = sorted(Path(f) for f in pydicom.data.get_testdata_files()
                   if os.path.isfile(f) and Path(f).is_relative_to(base))
    site = tmp_path / "corpus"
    site.mkdir()
    names = []
    with open(site / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "image_path", "label"])
        for i, f in enumerate(files):
            names.append(str(f.relative_to(base)).replace(os.sep, "__"))
            shutil.copyfile(f, site / names[-1])
            w.writerow([f"p{i:03d}", names[-1], i % 2])
    res = subprocess.run([sys.executable, "-m", "client.cli", "check", "--data", str(site)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stdout + res.stderr and "ERROR" not in res.stderr, res.stderr[-3000:]
    with open(site / ".equifed" / "rejected.csv", newline="") as fh:
        rejected = {r["image_path"]: r["reason"] for r in csv.DictReader(fh)}
    usable = int(res.stdout.split("images")[1].split("usable")[0])
    assert usable + len(rejected) == len(files) and all(rejected.values())
    assert not [r for r in rejected.values() if r.startswith("unexpected error")]
    newly = ["SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1, RGB
             "JPGExtended.dcm",  # 12-bit JPEG Extended
             "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS
             "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 that Pillow fails on
             "SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm",  # RGB / YBR
             "examples_palette.dcm", "examples_jpeg2k.dcm"]
    assert [n for n in newly if f"test_files__{n}" in rejected] == []
    images = sum("PixelData" in pydicom.dcmread(f, force=True, stop_before_pixels=False) for f in files)
    assert usable > 0.75 * images, (usable, images)  # 79 of 95 images with pydicom 3.0; 49 before the plugins
    # what pydicom logged while handling a file no plugin decodes went to the site's log instead
    assert "decoding failed" in rejected["test_files__JPEG-lossy.dcm"]
    assert "Traceback" in (site / ".equifed" / "client_errors.log").read_text()
