"""Hostile or broken input in a site's data folder: each bad file gets a clear Rejection, is refused before it can
exhaust the site (no decoding of oversized images, no reading outside the folder, no hanging on FIFOs), and the
usable images beside it still load."""

from __future__ import annotations

import csv
import io
import os
import struct
import threading
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from core_models.data import DEFAULT_LIMITS, ImageError, ImageLimits, ManifestError, load_npz, load_site, read_image
from core_models.data.cache import CACHE_DIR, _cache_load

DX = "1.2.840.10008.5.1.4.1.1.1.1"
HUGE = 60000  # 60000 x 60000 = 3.6e9 pixels: 7.2 GB as uint16 if anything allocated it
ALLOC_CEILING = 64 * 1024**2  # tracemalloc peak allowed while refusing it: far below HUGE * HUGE bytes
TIMEOUT = 10.0


def write_dicom(path, pixels=None, *, rows_cols=None, pixel_data=None, ts=ExplicitVRLittleEndian, preamble=True):
    """A small DX DICOM; `rows_cols` + `pixel_data` write a header that need not match the bytes that follow."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DX, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "P1", "DX"
    if pixels is not None:
        rows_cols, pixel_data = pixels.shape, pixels.astype(np.uint16).tobytes()
    ds.Rows, ds.Columns = rows_cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if pixel_data is not None:
        ds.PixelData = pixel_data
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:  # a bare dataset (old PACS export): no preamble, no 'DICM', read by the forced path
        bare = Dataset()
        bare.update(ds)
        bare.save_as(path, implicit_vr=True, little_endian=True)
    return path


def png_header_only(path, width, height):
    """A valid-looking PNG whose IHDR claims width x height 8-bit grey, with a tiny IDAT: a decompression bomb
    shape (Pillow would allocate width * height bytes to decode it)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def write_manifest(site, rows):
    with open(site / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "image_path", "label"])
        w.writerows(rows)


def good_site(tmp_path, rng, n=3):
    """A site folder with n usable DICOMs and one usable PNG; returns (site, rows)."""
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        write_dicom(site / "img" / f"{i}.dcm", rng.integers(0, 4000, (16, 16)))
        rows.append([f"{i:03d}", f"img/{i}.dcm", str(i % 2)])
    Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint8)).save(site / "img" / "ok.png")
    rows.append(["100", "img/ok.png", "1"])
    return site, rows


def guarded(fn, *args, **kwargs):
    """Run fn in a daemon thread; fail (instead of hanging the suite) if it has not returned within TIMEOUT."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive(), f"{fn.__name__} did not return within {TIMEOUT} s (blocked on a FIFO?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def measured(fn, *args, **kwargs):
    """(result or exception, seconds, tracemalloc peak bytes) of fn(*args, **kwargs)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        out = e
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak


# --------------------------------------------------------------------------------------------- oversized images


@pytest.mark.parametrize("kind", ["native-truncated", "native-no-pixels", "jpeg2000", "no-preamble"])
def test_huge_dicom_header_refused_before_decoding(tmp_path, kind):
    path = tmp_path / ("IM_HUGE" if kind == "no-preamble" else "huge.dcm")
    if kind == "native-truncated":
        write_dicom(path, rows_cols=(HUGE, HUGE), pixel_data=b"\0" * 64)
    elif kind == "native-no-pixels":
        write_dicom(path, rows_cols=(HUGE, HUGE))
    elif kind == "jpeg2000":  # a small compressed frame claiming a huge image: the real decompression bomb
        write_dicom(path, rows_cols=(HUGE, HUGE), ts=JPEG2000Lossless, pixel_data=encapsulate([b"\xff\x4f" * 32]))
    else:
        write_dicom(path, rows_cols=(HUGE, HUGE), pixel_data=b"\0" * 64, preamble=False)
    assert path.stat().st_size < 4096
    out, seconds, peak = measured(read_image, path, 8)
    assert isinstance(out, ImageError), out
    assert str(out).startswith(f"image too large: {HUGE} x {HUGE} pixels (limit 100,000,000 pixel values")
    assert seconds < 2.0 and peak < ALLOC_CEILING, (seconds, peak)


def test_huge_dicom_in_a_site_is_a_rejection_and_the_rest_loads(tmp_path):
    site, rows = good_site(tmp_path, np.random.default_rng(10))
    write_dicom(site / "img" / "huge.dcm", rows_cols=(HUGE, HUGE), pixel_data=b"\0" * 64)
    write_manifest(site, rows + [["200", "img/huge.dcm", "0"]])
    sd, seconds, peak = measured(load_site, site, image_size=8, cache=False)
    assert seconds < 2.0 and peak < ALLOC_CEILING, (seconds, peak)
    assert len(sd.labels) == len(rows)
    assert [(r.row, r.image_path) for r in sd.rejected] == [(len(rows), "img/huge.dcm")]
    assert f"image too large: {HUGE} x {HUGE} pixels" in sd.rejected[0].reason


def test_png_bomb_refused_with_default_limits_and_pillow_setting_restored(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    path = png_header_only(tmp_path / "bomb.png", HUGE, HUGE)
    out, seconds, peak = measured(read_image, path, 8)
    assert isinstance(out, ImageError) and str(out).startswith("image too large"), out
    assert seconds < 2.0 and peak < ALLOC_CEILING, (seconds, peak)
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("side", [40, 200])  # 1600 px: Pillow's warning band (cap..2 cap); 40000: its error band
def test_png_over_a_caller_cap_refused_under_it_loads(tmp_path, side):
    rng = np.random.default_rng(11)
    Image.fromarray(rng.integers(0, 256, (side, side)).astype(np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint8)).save(tmp_path / "small.png")
    limits = ImageLimits(max_pixels=1000)
    with pytest.raises(ImageError, match="image too large") as err:
        read_image(tmp_path / "big.png", 8, limits=limits)
    assert "1,000" in str(err.value)
    img, meta = read_image(tmp_path / "small.png", 8, limits=limits)
    assert img.shape == (8, 8) and meta["rows"] == 16
    read_image(tmp_path / "big.png", 8)  # the default cap takes it


def test_rgb_counts_its_samples(tmp_path):
    grey = np.random.default_rng(12).integers(0, 256, (20, 20)).astype(np.uint8)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "rgb.png")  # 400 px, 1200 values
    with pytest.raises(ImageError, match=r"image too large: 20 x 20 pixels x 3 samples \(= 1,200 values\)"):
        read_image(tmp_path / "rgb.png", limits=ImageLimits(max_pixels=1000))
    assert read_image(tmp_path / "rgb.png", limits=ImageLimits(max_pixels=1200))[0].shape == (20, 20)


def test_file_size_cap_and_limits_in_cache_key(tmp_path):
    site, rows = good_site(tmp_path, np.random.default_rng(13))
    write_manifest(site, rows)
    assert len(load_site(site, image_size=8).labels) == len(rows)  # cached with the default limits
    small = ImageLimits(max_file_bytes=400)  # the DICOMs are ~1 kB, the 16x16 PNG ~300 B
    sd = load_site(site, image_size=8, limits=small)  # other limits: not served from that cache
    assert sd.frame["image_path"].tolist() == ["img/ok.png"]
    assert all("image file too large" in r.reason and "limit 0.0 MiB" in r.reason for r in sd.rejected)
    assert len(sd.rejected) == len(rows) - 1
    again = load_site(site, image_size=8, limits=small)  # its own cache entry gives the same answer
    assert again.rejected == sd.rejected


def test_limits_are_validated():
    assert DEFAULT_LIMITS == ImageLimits() and DEFAULT_LIMITS.max_pixels == 100_000_000
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_pixels"):
            ImageLimits(max_pixels=bad)
    with pytest.raises(TypeError, match="ImageLimits"):
        read_image("x.png", limits={"max_pixels": 10})


# ----------------------------------------------------------------------------------------------- paths and files


def test_paths_outside_links_out_fifos_and_folders_rejected_rest_loads(tmp_path):
    site, rows = good_site(tmp_path, np.random.default_rng(14))
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(tmp_path / "outside.png")  # exists, outside the site
    os.symlink(tmp_path / "outside.png", site / "img" / "link_out.png")
    os.symlink(site / "img" / "0.dcm", site / "img" / "link_in.dcm")  # a link that stays inside is fine
    os.symlink("/dev/zero", site / "img" / "zero.dcm")
    os.mkfifo(site / "img" / "pipe.dcm")
    (site / "img" / "folder.png").mkdir()
    bad = [
        ["201", "../outside.png", "0", "outside the site folder: ../outside.png"],
        ["202", str(tmp_path / "outside.png"), "1", "outside the site folder"],
        ["203", "img/link_out.png", "0", "outside the site folder: img/link_out.png"],
        ["204", "img/zero.dcm", "0", "outside the site folder"],
        ["205", "/dev/zero", "0", "outside the site folder"],
        ["206", "img/pipe.dcm", "1", "not a regular file (a device, FIFO or folder): img/pipe.dcm"],
        ["207", "img/folder.png", "0", "not a regular file"],
        ["208", "img/../../site/img/missing.dcm", "0", "image file not found"],
        ["209", "img/a\0b.png", "0", "NUL character"],
    ]
    write_manifest(site, rows + [["210", "img/link_in.dcm", "1"]] + [b[:3] for b in bad])
    sd = guarded(load_site, site, image_size=8, cache=False)
    assert sd.frame["patient_id"].tolist() == [r[0] for r in rows] + ["210"]  # nothing usable lost
    assert sd.labels.tolist() == [int(r[2]) for r in rows] + [1]
    np.testing.assert_array_equal(sd.images[-1], sd.images[0])  # the inside link is image 0
    by_row = {r.row: r for r in sd.rejected}
    assert sorted(by_row) == list(range(len(rows) + 1, len(rows) + 1 + len(bad)))
    for row, (_, shown, _, reason) in zip(sorted(by_row), bad):
        assert by_row[row].image_path == shown and reason in by_row[row].reason, (shown, by_row[row].reason)


def test_fifo_read_directly_and_fifo_manifest_do_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match="not a regular file"):
        guarded(read_image, tmp_path / "pipe.png")
    site = tmp_path / "site"
    site.mkdir()
    os.mkfifo(site / "manifest.csv")
    with pytest.raises(ManifestError, match="not a regular file"):
        guarded(load_site, site)
    os.unlink(site / "manifest.csv")
    os.symlink("/dev/zero", site / "manifest.csv")
    with pytest.raises(ManifestError, match="not a regular file"):
        guarded(load_site, site)


def test_manifest_size_cap(tmp_path):
    site, rows = good_site(tmp_path, np.random.default_rng(15))
    write_manifest(site, rows)
    with pytest.raises(ManifestError, match="too large"):
        load_site(site, limits=ImageLimits(max_manifest_bytes=32))
    assert len(load_site(site, image_size=8, limits=ImageLimits(max_manifest_bytes=4096)).labels) == len(rows)


# ---------------------------------------------------------------------------------------------- cache and npz


def test_cache_folder_symlinked_out_is_not_written_through(tmp_path):
    site, rows = good_site(tmp_path, np.random.default_rng(16))
    write_manifest(site, rows)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manifest-s8-k2-keepme.npz").write_bytes(b"not ours")  # would match the old-version cleanup glob
    os.symlink(elsewhere, site / CACHE_DIR)
    first = load_site(site, image_size=8)
    second = load_site(site, image_size=8)
    np.testing.assert_array_equal(first.images, second.images)
    assert [p.name for p in elsewhere.iterdir()] == ["manifest-s8-k2-keepme.npz"]


def test_planted_cache_with_foreign_arrays_is_ignored(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, images=np.zeros((3, 32, 32), np.uint16), info=np.array('{"key": "k"}'))
    assert _cache_load(path, "k", n_images=3, image_size=8) is None  # wrong image size
    np.savez(path, images=np.zeros((5, 8, 8), np.uint16), info=np.array('{"key": "k"}'))
    assert _cache_load(path, "k", n_images=3, image_size=8) is None  # more images than the site has


def _npz_with_header_only(path, arrays):
    """An .npz whose members carry an .npy header (shape, dtype) followed by only a few bytes of data."""
    from numpy.lib import format as npy_format

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, (shape, dtype) in arrays.items():
            buf = io.BytesIO()
            npy_format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                    "shape": shape})
            zf.writestr(f"{name}.npy", buf.getvalue() + b"\0" * 64)
    return path


def test_npz_shapes_checked_from_headers_before_loading(tmp_path):
    path = _npz_with_header_only(tmp_path / "bomb.npz", {"train_images": ((2, HUGE, HUGE), "u1"),
                                                          "train_labels": ((2, 1), "u1")})
    out, seconds, peak = measured(load_npz, path, "train")
    assert isinstance(out, ValueError) and f"images too large: {HUGE} x {HUGE}" in str(out), out
    assert seconds < 2.0 and peak < ALLOC_CEILING
    path = _npz_with_header_only(tmp_path / "mismatch.npz", {"train_images": ((10**6, 28, 28), "u1"),
                                                              "train_labels": ((3,), "u1")})
    with pytest.raises(ValueError, match=r"1000000 images but labels of shape \(3,\)"):
        load_npz(path, "train")
    rng = np.random.default_rng(17)
    np.savez_compressed(tmp_path / "ok.npz", train_images=rng.integers(0, 256, (4, 28, 28)).astype(np.uint8),
                        train_labels=rng.integers(0, 2, (4, 1)))
    x, y = load_npz(tmp_path / "ok.npz", "train")
    assert x.shape == (4, 1, 28, 28) and y.shape == (4,)
    with pytest.raises(ValueError, match="images too large"):
        load_npz(tmp_path / "ok.npz", "train", limits=ImageLimits(max_pixels=28 * 28 - 1))
