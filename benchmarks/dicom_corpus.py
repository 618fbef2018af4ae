"""Compressed and colour DICOM: how much of pydicom's own test corpus the data layer takes, and what decoding costs.

Why: PACS exports arrive as JPEG Lossless, JPEG-LS, JPEG 2000, RLE and colour secondary captures; the data layer
decodes them through pydicom's pixel-data plugins (pylibjpeg + libjpeg / openjpeg / rle, pyjpegls). This measures
what that adds and what it costs next to uncompressed files.

    python benchmarks/dicom_corpus.py [--n 30] [--side 512] [--repeats 3] [--before-rev REV]

1. corpus: every regular file of pydicom.data.get_testdata_files() through core_models.data.read_image, each
   configuration in a fresh process: "before" = the data layer as it was before the plugins (its
   core_models/data.py from git, the last version without _PREFERRED_PLUGIN, or --before-rev) with the plugin
   modules hidden, as they were not installed then; "no plugins" = today's data layer with them hidden (Pillow
   and pydicom alone); "after" = today's with them.
2. decoders: ms per image of every available pydicom plugin on the same synthetic images, per syntax (the evidence
   for the plugin order in core_models.data.dicom._PREFERRED_PLUGIN).
3. ingest: load_site(cache=False) images/s on n synthetic side x side images per syntax, interleaved, median of
   `--repeats`, as a ratio to the uncompressed site of the same bit depth, measured side by side in this run.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN_MODULES = ("pylibjpeg", "libjpeg", "openjpeg", "rle", "jpeg_ls", "gdcm")
REASONS = (  # rejection reason -> kind, first match wins
    ("no decoder available", "no decoder for the compressed syntax"),
    ("decoding failed", "compressed, decoding failed"),
    ("codestream is", "compressed, codestream disagrees with header"),
    ("colour", "colour image"),
    ("multi-frame", "multi-frame"),
    ("no pixel data", "no pixel data (not an image)"),
    ("unrecognised file format", "not DICOM / not an image"),
    ("not a DICOM file", "not DICOM / not an image"),
    ("too small", "image too small (< 8 px)"),
    ("no image dimensions", "no Rows / Columns"),
    ("cannot decode pixel data", "uncompressed, pixel data unreadable"),
)


def _kind(reason: str) -> str:
    return next((kind for key, kind in REASONS if key in reason), "other: " + reason[:60])


# ------------------------------------------------------------------------------------------------------- corpus


def corpus_worker(module_path: str | None, hide: bool) -> None:
    """(in a fresh process) one JSON line per corpus file: whether read_image took it, and why not."""
    if hide:
        for name in PLUGIN_MODULES:  # import of a None entry raises ModuleNotFoundError: "not installed"
            sys.modules[name] = None
    import warnings

    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("pydicom").propagate = False  # the handled-error tracebacks of the old code
    import pydicom
    import pydicom.data

    sys.path.insert(0, str(REPO))
    if module_path:
        spec = importlib.util.spec_from_file_location("data_before", module_path)
        data = sys.modules["data_before"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(data)
    else:
        from core_models import data
    base = Path(pydicom.data.__file__).parent
    for f in sorted(Path(p) for p in pydicom.data.get_testdata_files() if os.path.isfile(p)):
        try:
            has_pixels = "PixelData" in pydicom.dcmread(f, force=True)
        except Exception:
            has_pixels = False
        try:
            data.read_image(f, 64)
            reason = ""
        except data.ImageError as e:
            reason = str(e)
        except Exception as e:  # the report counts these, they must not end it
            reason = f"unexpected {type(e).__name__}: {e}"
        print(json.dumps({"file": str(f.relative_to(base)), "pixels": has_pixels, "reason": reason}))


def before_source(rev: str | None) -> str | None:
    """core_models/data.py as it was before the plugins: at `rev`, else the newest version in git without them."""
    def show(r):
        return subprocess.run(["git", "show", f"{r}:core_models/data.py"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout
    try:
        if rev:
            return show(rev)
        revs = subprocess.run(["git", "log", "--format=%H", "--", "core_models/data.py"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.split()
        for r in revs:
            try:
                text = show(r)
            except subprocess.CalledProcessError:  # no data.py there: split into core_models/data/
                continue
            if "_PREFERRED_PLUGIN" not in text:
                return text
    except (OSError, subprocess.CalledProcessError):
        pass
    return None


def run_corpus(label: str, hide: bool, module_path: str | None = None) -> list[dict]:
    cmd = [sys.executable, __file__, "--corpus-worker", "--hide" if hide else "--no-hide"]
    if module_path:
        cmd += ["--module", module_path]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    print(f"  {label:<12} {sum(not r['reason'] for r in rows):>3} of {len(rows)} files decoded "
          f"({sum(not r['reason'] for r in rows if r['pixels'])} of {sum(r['pixels'] for r in rows)} DICOMs with "
          f"pixel data)")
    return rows


def corpus(before_rev: str | None) -> None:
    print("1. pydicom's bundled test files through read_image")
    results = {}
    source = before_source(before_rev)
    if source is None:
        print("  before       (no git history here: skipped)")
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
            fh.write(source)
        try:
            results["before"] = run_corpus("before", True, fh.name)
        finally:
            os.unlink(fh.name)
    results["no plugins"] = run_corpus("no plugins", True)
    results["after"] = run_corpus("after", False)
    labels = list(results)
    kinds = Counter()
    for rows in results.values():
        kinds.update(_kind(r["reason"]) for r in rows if r["reason"])
    print(f"\n  {'rejected as':<48}" + "".join(f"{k:>12}" for k in labels))
    for kind, _ in kinds.most_common():
        counts = [sum(1 for r in results[k] if r["reason"] and _kind(r["reason"]) == kind) for k in labels]
        print(f"  {kind:<48}" + "".join(f"{c:>12}" for c in counts))
    first, last = results[labels[0]], results["after"]
    gained = [a["file"] for a, b in zip(first, last) if a["reason"] and not b["reason"]]
    lost = [a["file"] for a, b in zip(first, last) if not a["reason"] and b["reason"]]
    print(f"\n  decoded after, not {labels[0]} ({len(gained)}): {', '.join(Path(g).name for g in gained)}")
    print(f"  decoded {labels[0]}, not after ({len(lost)}): {', '.join(Path(g).name for g in lost) or 'none'}")


# ------------------------------------------------------------------------------------------ decoders and ingest


def write_sites(root: Path, n: int, side: int) -> dict[str, Path]:
    """One site folder per syntax with the same n images: 12-bit grey, and 8-bit RGB for the colour rows."""
    import numpy as np
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

    sys.path.insert(0, str(REPO / "tests"))
    from test_dicom_codecs import dicom, jpeg_lossless  # the tests' writer and JPEG Lossless encoder

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    variants = {  # name -> (bits, writer of one image)
        "grey12 uncompressed": lambda p, g, c: dicom(p, g, bits_stored=12),
        "grey12 RLE": lambda p, g, c: dicom(p, g, bits_stored=12, ts=RLELossless, plugin="pylibjpeg"),
        "grey12 JPEG Lossless SV1": lambda p, g, c: dicom(p, g, bits_stored=12, write_ts=JPEGLosslessSV1,
                                                          pixel_data=encapsulate([jpeg_lossless(g, 12)])),
        "grey12 JPEG-LS lossless": lambda p, g, c: dicom(p, g, bits_stored=12, ts=JPEGLSLossless,
                                                         plugin="pyjpegls"),
        "grey12 JPEG 2000 lossless": lambda p, g, c: dicom(p, g, bits_stored=12, ts=JPEG2000Lossless,
                                                           plugin="pylibjpeg"),
        "rgb8 uncompressed": lambda p, g, c: dicom(p, c, photometric="RGB"),
        "rgb8 JPEG baseline 4:2:2": lambda p, g, c: dicom(p, c, photometric="YBR_FULL_422",
                                                          write_ts=JPEGBaseline8Bit,
                                                          pixel_data=encapsulate([_jpeg(c, Image)])),
    }
    sites = {}
    for name, write in variants.items():
        site = root / name.replace(" ", "_")
        site.mkdir()
        lines = ["patient_id,image_path,label"]
        for i in range(n):
            field = 1800 + 1400 * np.sin(6 * xx + i) * np.cos(4 * yy) + rng.normal(0, 40, (side, side))
            grey = np.clip(field, 0, 4095).astype(np.uint16)
            rgb = np.stack([grey >> 4, (4095 - grey) >> 4, np.full_like(grey, 128 + i)], axis=-1).astype(np.uint8)
            write(site / f"{i:04d}.dcm", grey, rgb)
            lines.append(f"{i:04d},{i:04d}.dcm,{i % 2}")
        (site / "manifest.csv").write_text("\n".join(lines) + "\n")
        sites[name] = site
    return sites


def _jpeg(rgb, Image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, subsampling=1)
    return buf.getvalue()


def decoders(sites: dict[str, Path], k: int = 5) -> None:
    import pydicom
    from pydicom.pixels import get_decoder, pixel_array

    print("\n2. ms per image of each available pydicom plugin (first", k, "images of each site)")
    for name, site in sites.items():
        paths = sorted(site.glob("*.dcm"))[:k]
        ts = pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
        if not ts.is_compressed:
            continue
        raw = [p.read_bytes() for p in paths]
        cells = []
        for plugin in get_decoder(ts).available_plugins:
            t = time.perf_counter()
            for b in raw:
                pixel_array(io.BytesIO(b), decoding_plugin=plugin)
            cells.append(f"{plugin} {(time.perf_counter() - t) / len(raw) * 1e3:.1f}")
        print(f"  {name:<28} " + ", ".join(cells))


def ingest(sites: dict[str, Path], n: int, repeats: int, image_size: int) -> None:
    from core_models.data import load_site

    print(f"\n3. load_site(cache=False) on {n} images per site, to {image_size}x{image_size}, median of {repeats}")
    for site in sites.values():  # untimed: page cache and table caches warm for all alike
        load_site(site, image_size=image_size, cache=False)
    times = {name: [] for name in sites}
    for _ in range(repeats):
        for name, site in sites.items():
            t = time.perf_counter()
            sd = load_site(site, image_size=image_size, cache=False)
            times[name].append(time.perf_counter() - t)
            assert len(sd.labels) == n and not sd.rejected, (name, sd.rejected[:1])
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"  {'site':<28}{'images/s':>10}{'vs uncompressed':>17}{'MB on disk':>12}")
    for name, site in sites.items():
        ref = rate["rgb8 uncompressed" if name.startswith("rgb8") else "grey12 uncompressed"]
        mb = sum(p.stat().st_size for p in site.glob("*.dcm")) / 1e6
        print(f"  {name:<28}{rate[name]:>10.1f}{rate[name] / ref:>16.2f}x{mb:>12.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30, help="images per synthetic site")
    ap.add_argument("--side", type=int, default=512, help="their side in pixels")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before-rev", default=None, help="git revision of the 'before' data layer")
    ap.add_argument("--corpus-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hide", action=argparse.BooleanOptionalAction, default=False, help=argparse.SUPPRESS)
    ap.add_argument("--module", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.corpus_worker:
        corpus_worker(args.module, args.hide)
        return

    import numpy as np
    import pydicom

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {platform.python_version()}, pydicom {pydicom.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs (load avg {load:.2f})\n")
    corpus(args.before_rev)
    root = Path(tempfile.mkdtemp(prefix="equifed-bench-dicom-"))
    try:
        t0 = time.perf_counter()
        sites = write_sites(root, args.n, args.side)
        print(f"\n(wrote {len(sites)} sites of {args.n} images {args.side}x{args.side} in "
              f"{time.perf_counter() - t0:.0f} s)")
        decoders(sites)
        ingest(sites, args.n, args.repeats, args.image_size)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
