"""Sites built from real images in a MedMNIST-format ``.npz`` (keys ``{train,val,test}_{images,labels}``).

* ``partition_npz``: split one split of the archive into K hospital folders (PNG + manifest.csv), IID or with
  Dirichlet(alpha) label skew. Every image goes to exactly one site. ``equifed-partition``
  (simulations/partition.py) does the whole archive: train/val to the sites, test to a global holdout.
* ``overlay_social_mechanism``: a semi-synthetic site whose D is the real label and whose image base is the real image;
  A is drawn given D, S from A as in the generator, and the scanner mechanism (contrast, blur, noise, corner marker) is
  applied over the real image. Written like a generated site (DICOM + manifest + truth), so
  ``generator.rerender_counterfactual`` works on it unchanged.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from simulations.generator import exogenous_draws, structural_rows, write_site, finish_truth, site_columns
from simulations.scenario import SiteSpec


def _load_split(npz_path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(npz_path) as z:
        key_x, key_y = f"{split}_images", f"{split}_labels"
        if key_x not in z or key_y not in z:
            raise KeyError(f"{npz_path}: no '{key_x}'/'{key_y}' arrays (has: {sorted(z.files)})")
        images, labels = z[key_x], np.asarray(z[key_y])
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise ValueError(f"{npz_path}: {split}_labels has {labels.shape[1]} columns (multi-label); "
                         "only single-label sets can be partitioned by label")
    labels = labels.reshape(-1).astype(int)
    if len(labels) != len(images):
        raise ValueError(f"{npz_path}: {len(images)} images but {len(labels)} labels in split '{split}'")
    return images, labels


def _prepare_dir(path: Path, overwrite: bool) -> None:
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        shutil.rmtree(path)
    (path / "images").mkdir(parents=True)


def dirichlet_partition(labels: np.ndarray, k: int, alpha: float | None, seed: int,
                        min_per_site: int = 10, max_tries: int = 100,
                        groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Indices per site. ``alpha=None``: an IID random split. Otherwise, per class, the class's images are divided
    among the sites with proportions ~ Dirichlet(alpha); redrawn until every site holds ``min_per_site`` images
    (capped at N // k), since a site with no data cannot take part.

    ``groups`` (one value per index, e.g. the source's "train"/"val" split): each group is divided separately, with
    the same per-class proportions, so a site's validation rows follow its training label mix; every site gets at
    least one index of every group."""
    rng = np.random.default_rng([int(seed), 0x5EED])
    labels = np.asarray(labels)
    n = len(labels)
    if k < 1 or k > n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    group_of = np.zeros(n, dtype=int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    names = [None] if groups is None else list(np.unique(np.asarray(groups)))
    for g, name in enumerate(names):
        size = int((group_of == g).sum())
        if size < k:
            raise ValueError(f"only {size} {name!r} item(s) for {k} sites: every site needs at least one")
    if alpha is None:
        parts = [np.array_split(rng.permutation(np.flatnonzero(group_of == g)), k) for g in range(len(names))]
        return [np.sort(np.concatenate([p[j] for p in parts])) for j in range(k)]
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    need = min(min_per_site, n // k)
    for _ in range(max_tries):
        chunks: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in np.unique(labels):
            members = [rng.permutation(np.flatnonzero((labels == c) & (group_of == g))) for g in range(len(names))]
            share = np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1]
            for idx in members:
                for j, chunk in enumerate(np.split(idx, (share * len(idx)).astype(int))):
                    chunks[j].append(chunk)
        sites = [np.sort(np.concatenate(p)) for p in chunks]
        if min(len(s) for s in sites) >= need and all(
                len(np.unique(group_of[s])) == len(names) for s in sites):
            return sites
    raise RuntimeError(f"no Dirichlet(alpha={alpha}) partition gave every one of {k} sites >= {need} images "
                       f"(and one of every group) in {max_tries} tries; raise alpha or lower k")


def partition_npz(npz_path: str | Path, out_dir: str | Path, k: int, alpha: float | None = None, seed: int = 0,
                  split: str = "train", image_size: int | None = None, *, site_prefix: str = "site",
                  min_per_site: int = 10, overwrite: bool = False) -> list[Path]:
    """Write K site folders ``<out_dir>/<site_prefix>_<j>`` (j = 1..K) with ``images/<patient_id>.png`` and
    ``manifest.csv`` (patient_id, image_path, label, site, source_index, split). Returns the site dirs in order."""
    images, labels = _load_split(npz_path, split)
    parts = dirichlet_partition(labels, k, alpha, seed, min_per_site=min_per_site)
    out_dir = Path(out_dir)
    dirs = []
    for j, idx in enumerate(parts, start=1):
        name = f"{site_prefix}_{j}"
        site_dir = out_dir / name
        _prepare_dir(site_dir, overwrite)
        rows = []
        for i, src in enumerate(idx):
            pid = f"{name}-{i:05d}"
            img = Image.fromarray(np.asarray(images[src]).astype(np.uint8))
            if image_size and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            img.save(site_dir / "images" / f"{pid}.png")
            rows.append({"patient_id": pid, "image_path": f"images/{pid}.png", "label": int(labels[src]),
                         "site": name, "source_index": int(src), "split": split})
        pd.DataFrame(rows, columns=["patient_id", "image_path", "label", "site", "source_index", "split"]).to_csv(
            site_dir / "manifest.csv", index=False)
        dirs.append(site_dir)
    return dirs


def overlay_social_mechanism(npz_path: str | Path, out_dir: str | Path, scenario_site_spec: SiteSpec, seed: int, *,
                             split: str = "train", n: int | None = None, image_size: int | None = None,
                             p_a_given_d: Sequence[float] = (0.35, 0.65),
                             positive_labels: Sequence[int] | None = None, name: str | None = None,
                             overwrite: bool = False) -> Path:
    """A semi-synthetic site in ``<out_dir>/<name>`` (default: the spec's name); returns its folder.

    D = the real label (binary, or ``label in positive_labels``); A ~ Bernoulli(p_a_given_d[D]) so that A and D are
    associated; C and S follow the spec (S = 1[U_S < p_s(A)], with S_cf stored); X = apply_scanner(real image, S).
    The spec's disease and lesion knobs are unused. ``n``: a seeded random subset of the split (default: all of it).
    """
    site = scenario_site_spec
    name = name or site.name
    npz_path = Path(npz_path).resolve()
    images, labels = _load_split(npz_path, split)
    if positive_labels is not None:
        d_all = np.isin(labels, list(positive_labels)).astype(int)
    elif set(np.unique(labels)) <= {0, 1}:
        d_all = labels
    else:
        raise ValueError(f"{npz_path}: labels {sorted(set(np.unique(labels)))} are not binary; "
                         "pass positive_labels to say which classes count as disease")
    if len(p_a_given_d) != 2 or not all(0.0 <= p <= 1.0 for p in p_a_given_d):
        raise ValueError(f"p_a_given_d must be two probabilities (for D=0, D=1), got {p_a_given_d!r}")
    total = len(labels)
    if n is None:
        src = np.arange(total)
    else:
        if not 1 <= n <= total:
            raise ValueError(f"n must lie in [1, {total}], got {n}")
        src = np.sort(np.random.default_rng([int(seed), zlib.crc32(name.encode()), 1]).choice(total, n, replace=False))
    size = int(image_size or images.shape[1])

    exo, seeds = exogenous_draws(seed, name, len(src))
    d = d_all[src]
    a = (exo["U_A"].to_numpy() < np.where(d == 1, p_a_given_d[1], p_a_given_d[0])).astype(int)
    structural = structural_rows(site, exo, np.nan, a=a, d=d)
    truth = finish_truth(name, structural, seeds, size, {**site_columns(site), "lesion_contrast": 0.0}, site.name)
    truth["base_npz"] = str(npz_path)
    truth["base_split"] = split
    truth["base_index"] = src
    truth["orig_label"] = labels[src]
    truth["p_A_d0"], truth["p_A_d1"] = float(p_a_given_d[0]), float(p_a_given_d[1])

    site_dir = Path(out_dir) / name
    _prepare_dir(site_dir, overwrite)
    return write_site(truth, site_dir, uid_key=f"equifed-overlay:{seed}:{name}")
