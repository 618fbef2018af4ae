"""Seconds to read a 200-slice CT series (pydicom's CT_small.dcm, 128 x 128, copied to 200 positions) with
core_models.data.volumes vs MONAI's own LoadImage (PydicomReader) on the same folder, and to load it as a site
through load_site's cache, cold and warm.

    .venv/bin/python benchmarks/bench_volume_ingest.py [--slices 200] [--side 64] [--repeats 5]

Rows: "read" is assembling the series into HU voxels (ours: every header checked before any pixel data are decoded;
MONAI: sorted by InstanceNumber, no checks); "to grid" adds orientation to RAS, the soft-tissue window and the resize
to side^3 (MONAI's transforms after LoadImage for the baseline); load_site cold decodes and writes the cache, warm
reads the cache. Best of `repeats` (the page cache is warm after the first pass for both readers alike).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _write_series(folder: Path, n: int) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    x0, y0, z0 = (float(v) for v in src.ImagePositionPatient)
    folder.mkdir(parents=True)
    for k in range(n):
        ds = copy.deepcopy(src)
        ds.ImagePositionPatient = [x0, y0, z0 + 1.25 * k]
        ds.InstanceNumber = k + 1
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{k + 1}"
        ds.save_as(folder / f"IM{k:04d}.dcm")


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    import torch
    from monai.transforms import LoadImage, Orientation, Resize, ScaleIntensityRange

    from core_models.data import VolumeSettings, load_site, read_volume
    from core_models.data.limits import DEFAULT_LIMITS
    from core_models.data.volumes import _read_series, volume_files

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    settings = VolumeSettings.from_window("soft-tissue")
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        series = site / "s1"
        _write_series(series, args.slices)
        (site / "manifest.csv").write_text("patient_id,image_path,label\np1,s1,1\n")

        loader = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)
        window = ScaleIntensityRange(a_min=-160, a_max=240, b_min=0.0, b_max=1.0, clip=True)
        orient = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
        resize = Resize((args.side,) * 3, mode="area")

        def ours_read():
            return _read_series(volume_files(site, series), DEFAULT_LIMITS, settings)[0]

        def monai_grid():
            return resize(window(orient(loader(str(series)))))

        rows = []
        t_ours, vol = _best(ours_read, args.repeats)
        t_monai, mvol = _best(lambda: loader(str(series)), args.repeats)
        assert vol.shape == tuple(mvol.shape[1:]), (vol.shape, mvol.shape)
        rows.append(("read (HU voxels)", t_ours, t_monai))
        t_ours_g, ours = _best(lambda: read_volume(series, args.side, settings, site_dir=site)[0], args.repeats)
        t_monai_g, theirs = _best(monai_grid, args.repeats)
        rows.append((f"to grid {args.side}^3", t_ours_g, t_monai_g))
        diff = float(np.abs(ours - theirs.as_tensor().numpy()).max())

        cold, warm = [], []
        for _ in range(args.repeats):
            for f in (site / ".equifed_cache").glob("*"):
                f.unlink()
            t = time.perf_counter()
            load_site(site, image_size=args.side, volume=settings)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            load_site(site, image_size=args.side, volume=settings)
            warm.append(time.perf_counter() - t)

    print(f"{args.slices}-slice 128x128 CT series, best of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'step':<22}{'ours s':>9}{'MONAI s':>9}{'speed vs MONAI':>16}")
    for name, ours_s, monai_s in rows:
        print(f"{name:<22}{ours_s:>9.3f}{monai_s:>9.3f}{monai_s / ours_s:>15.2f}x")
    print(f"max |ours - MONAI| on the grid: {diff:.2e} (both sorted the same here: InstanceNumber follows position)")
    print(f"load_site cold (read + cache write) {min(cold):.3f} s, warm (cache hit) {min(warm):.4f} s: "
          f"{min(cold) / min(warm):.0f}x")


if __name__ == "__main__":
    main()
