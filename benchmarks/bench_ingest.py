"""DICOM ingest throughput: core_models.data.load_site against a bare pydicom loop.

Why: a federated run restarts site clients often; ingest must cost no more than the minimum pydicom needs (cold), and
the decoded-image cache must make restarts nearly free (warm).

    python benchmarks/bench_ingest.py [--n 500] [--side 256] [--image-size 64] [--repeats 3]

Measures, interleaved, each `--repeats` times (median reported):
  bare        pydicom.dcmread(p).pixel_array -> float32 min-max -> the same resize as load_site
  bare lean   the same with pydicom.pixels.pixel_array(open file) (reference: the reader load_site uses)
  no-cache    load_site(..., cache=False)
  cache-cold  load_site(..., cache=True) with the cache removed first, untimed (decodes and writes the cache)
  cache-warm  load_site(..., cache=True) again (nothing changed: reads the cache)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core_models.data import CACHE_DIR, load_site  # noqa: E402
from core_models.data.pixels import _resize  # noqa: E402


def write_site(root: Path, n: int, side: int, seed: int = 0) -> list[Path]:
    """n synthetic 12-bit DX images (smooth field + noise), CT-like rescale on half, a window on a third."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side] / side
    paths, lines = [], ["patient_id,image_path,label,sex"]
    for i in range(n):
        field = 2000 + 1500 * np.sin(6 * xx + i) * np.cos(4 * yy)
        px = np.clip(field + rng.normal(0, 100, (side, side)), 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = root / "img" / f"{i:05d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientSex, ds.PatientAge = f"{i:05d}", "MF"[i % 2], f"{30 + i % 50:03d}Y"
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "DX", f"Vendor{i % 3}", f"Model{i % 5}"
        ds.Rows = ds.Columns = side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2" if i % 4 else "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        if i % 2:
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if i % 3 == 0:
            ds.WindowCenter, ds.WindowWidth = 1000, 3000
        ds.PixelData = px.tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        lines.append(f"{i:05d},img/{i:05d}.dcm,{i % 2},{'MF'[i % 2]}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return paths


def bare(paths: list[Path], size: int) -> np.ndarray:
    out = np.empty((len(paths), 1, size, size), dtype=np.float32)
    for i, p in enumerate(paths):
        a = pydicom.dcmread(p).pixel_array.astype(np.float32)
        lo, hi = a.min(), a.max()
        out[i, 0] = _resize((a - lo) / (hi - lo), size)
    return out


def bare_lean(paths: list[Path], size: int) -> np.ndarray:
    """Reference only: pydicom's lean reader (pixels.pixel_array on an open file), which load_site uses."""
    out = np.empty((len(paths), 1, size, size), dtype=np.float32)
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            a = pydicom.pixels.pixel_array(f).astype(np.float32)
        lo, hi = a.min(), a.max()
        out[i, 0] = _resize((a - lo) / (hi - lo), size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="equifed-bench-ingest-"))
    try:
        t0 = time.perf_counter()
        paths = write_site(root, args.n, args.side)
        print(f"wrote {args.n} DICOMs {args.side}x{args.side} uint16 in {time.perf_counter() - t0:.1f} s ({root})")
        bare(paths, args.image_size)  # untimed pass: page cache and imports equally warm for every variant
        cache_dir = root / CACHE_DIR

        def drop_cache():
            shutil.rmtree(cache_dir, ignore_errors=True)

        # name -> (untimed setup, timed call)
        variants = {
            "bare pydicom loop": (None, lambda: bare(paths, args.image_size)),
            "bare lean pixel_array": (None, lambda: bare_lean(paths, args.image_size)),
            "load_site no-cache": (None, lambda: load_site(root, image_size=args.image_size, cache=False)),
            "load_site cache-cold": (drop_cache, lambda: load_site(root, image_size=args.image_size, cache=True)),
            "load_site cache-warm": (None, lambda: load_site(root, image_size=args.image_size, cache=True)),
        }
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, (setup, fn) in variants.items():
                if setup is not None:
                    setup()
                t = time.perf_counter()
                result = fn()
                times[name].append(time.perf_counter() - t)
                n_out = len(result) if isinstance(result, np.ndarray) else len(result.images)
                assert n_out == args.n, (name, n_out)
        assert len(list(cache_dir.glob("*.npz"))) == 1, "the warm runs must have found one cache file"

        med = {k: statistics.median(v) for k, v in times.items()}
        rate = {k: args.n / v for k, v in med.items()}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\npython {platform.python_version()}, pydicom {pydicom.__version__}, numpy {np.__version__}, "
              f"{os.cpu_count()} CPUs (load avg {load:.2f}); n={args.n}, {args.side}->{args.image_size}, "
              f"median of {args.repeats}")
        print(f"{'variant':<24}{'median s':>10}{'images/s':>12}{'best s':>9}   runs (s)")
        for k in variants:
            runs = ", ".join(f"{t:.3f}" for t in times[k])
            print(f"{k:<24}{med[k]:>10.3f}{rate[k]:>12.0f}{min(times[k]):>9.3f}   {runs}")
        b = rate["bare pydicom loop"]
        print(f"\nno-cache / bare   = {rate['load_site no-cache'] / b:.2f}x  (target >= 0.9)")
        print(f"cache-cold / bare = {rate['load_site cache-cold'] / b:.2f}x  (target >= 0.9)")
        print(f"cache-warm / bare = {rate['load_site cache-warm'] / b:.1f}x  (target >= 10)")
        best = {k: min(v) for k, v in times.items()}
        print("same ratios from the best run of each (less sensitive to other load on the machine): "
              f"no-cache {best['bare pydicom loop'] / best['load_site no-cache']:.2f}x, "
              f"cache-cold {best['bare pydicom loop'] / best['load_site cache-cold']:.2f}x, "
              f"cache-warm {best['bare pydicom loop'] / best['load_site cache-warm']:.1f}x")
        print(f"no-cache / bare lean = {rate['load_site no-cache'] / rate['bare lean pixel_array']:.2f}x  "
              "(reference: the cost of load_site's checks, metadata and intensity handling)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
