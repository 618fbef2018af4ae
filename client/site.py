"""A hospital's local data as the client sees it: decoded images, splits, rejections.

Everything here stays on the site. Only counts leave it (see client/app.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from client.policy import SitePolicy
from core_models.data import SiteData, load_site, write_rejected
from core_models.data.boxes import image_boxes
from core_models.splits import assign_splits, check_no_leakage

STATE_DIR = ".equifed"  # per-site state that must persist: split, rejections, privacy ledger
SITE_LOG = Path(STATE_DIR) / "client_errors.log"  # the site's own log of what went wrong, kept at the site


@dataclass
class LocalSite:
    name: str
    path: Path
    data: SiteData
    split: pd.Series  # "train" / "val" / "test" per accepted row
    image_size: int = 0  # the model input's side, what the images were resized to
    _boxes: tuple | None = field(default=None, repr=False)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        mask = (self.split == name).to_numpy()
        return self.data.images[mask], self.data.labels[mask]

    def count(self, name: str) -> int:
        return int((self.split == name).sum())

    def boxes(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """A split's lesion boxes (pixels of the model input) and which images are annotated, from the site's
        boxes.csv (read once; a site without one: no image is annotated, they train the classifier only)."""
        if self._boxes is None:
            found = image_boxes(self.path, self.data.frame, self.image_size)
            n = len(self.data.frame)
            self._boxes = found if found is not None else ([np.zeros((0, 4), np.float32)] * n, np.zeros(n, bool))
        per_image, annotated = self._boxes
        mask = (self.split == name).to_numpy()
        return [b for b, m in zip(per_image, mask) if m], annotated[mask]


_LOADED: dict[tuple, LocalSite] = {}  # (folder, image size, seed, classes[, channels when not 1])


def resolve_site_path(node_config: dict, run_config: dict) -> Path:
    """The site's data folder: `data-path` from the SuperNode's node config (deployment),
    else the `partition-id`-th site of the run's `data-root` (simulation)."""
    if node_config.get("data-path"):
        return Path(str(node_config["data-path"])).expanduser()
    root = str(run_config.get("data-root", ""))
    if not root or "partition-id" not in node_config:
        raise ValueError(
            "no data for this client: set node config 'data-path' (deployment) "
            "or run config 'data-root' (simulation)"
        )
    sites = list_sites(Path(root))
    pid = int(node_config["partition-id"])
    if pid >= len(sites):
        raise ValueError(f"partition-id {pid} but data-root {root} holds only {len(sites)} site(s)")
    return sites[pid]


def list_sites(root: Path) -> list[Path]:
    """Client site folders of a consortium folder, in the generator's order when known."""
    index = root / "consortium.json"
    if index.exists():
        return [root / d for d in json.loads(index.read_text())["site_dirs"]]
    return sorted(p for p in root.iterdir() if (p / "manifest.csv").exists() and p.name != "holdout")


def open_site(path: Path, image_size: int, seed: int, num_classes: int = 2, name: str | None = None,
              node_config: dict | None = None, channels: int = 1, volume=None) -> LocalSite:
    """Load (once per process) and split a site; write its split and rejection list locally. The manifest's rows
    without a label are kept apart (`data.unlabelled`): only a self-supervised pretext run trains on them, and every
    run sees the same patients (the site's delta counts them all). `channels`: 1 grey, 3 RGB (run config
    in-channels); `volume`: how a volume run reads its studies (core_models.data.VolumeSettings; None: images)."""
    key = (str(path.resolve()), image_size, seed, num_classes) + ((channels,) if channels != 1 else ()) \
        + ((volume.key,) if volume is not None else ())
    if key in _LOADED:
        return _LOADED[key]
    with pydicom_to_site_log(path):
        data = load_site(path, image_size=image_size, num_classes=num_classes,
                         limits=SitePolicy.load(path, node_config).image_limits(), unlabelled=True,
                         **({"channels": channels} if channels != 1 else {}),
                         **({"volume": volume} if volume is not None else {}))
    split = assign_splits(data.frame, seed=seed) if len(data.frame) else pd.Series([], dtype=object)
    frame = data.frame.assign(split=split.to_numpy())
    check_no_leakage(frame)
    state = path / STATE_DIR
    try:
        state.mkdir(exist_ok=True)
        frame[["patient_id", "split"]].drop_duplicates().to_csv(state / f"split_seed{seed}.csv", index=False)
        write_rejected(data.rejected, state / "rejected.csv")
    except OSError:
        pass  # read-only data folder: the split is deterministic from the seed anyway
    if name is None:
        name = str(frame["site"].iloc[0]) if "site" in frame.columns and len(frame) else path.name
    site = LocalSite(name=name, path=path, data=data, split=split.reset_index(drop=True), image_size=image_size)
    _LOADED[key] = site
    return site


@contextlib.contextmanager
def pydicom_to_site_log(data):
    """pydicom logs, with tracebacks, errors it handles itself (each plugin that fails on a frame before another
    decodes it or the image becomes a rejection): on the console they read as failures of the check. While a site's
    images load (the check, every ClientApp task) they go to the site's `.equifed/client_errors.log` instead (only if there is one to write: nothing
    is created outside an existing data folder), and pydicom's warnings, which repeat its logged messages, are not
    printed. The rejection reasons themselves are in the summary and in `.equifed/rejected.csv`."""
    logger = logging.getLogger("pydicom")
    path, handler = Path(data).expanduser() / SITE_LOG, None
    try:
        if path.parent.parent.is_dir():
            path.parent.mkdir(exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8", delay=True)  # the file appears with a record
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    except OSError:  # a read-only data folder: the records are dropped, the reasons stay in the summary
        handler = None
    propagate = logger.propagate
    logger.propagate = False
    if handler is not None:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="pydicom")
            yield path if handler is not None else None
    finally:
        logger.propagate = propagate
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()


def site_max_epsilon(path: Path, node_config: dict) -> float:
    """The site's privacy budget (its policy's `max-epsilon`); the server has no say."""
    return SitePolicy.load(path, node_config).max_epsilon
