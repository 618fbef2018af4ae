"""Where a manifest's image paths may point: regular files inside the site's own folder.

A manifest is data, and data can be wrong or hostile: `../../etc/shadow`, an absolute path to another
hospital's share, a symlink out of the folder, a FIFO or `/dev/zero` that never ends when read. Every reader of
image files (the decoder, the dataset fingerprint) goes through `resolve_site_file` first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafePath(ValueError):
    """An image path the site must not read; the message is the reason a data manager can act on."""


def resolve_site_file(site_dir, rel: str) -> tuple[Path, os.stat_result]:
    """The real path of `rel` (relative to `site_dir`) and its stat, if it is a regular file inside the folder.

    Symlinks are followed and the target must still be inside `site_dir` (resolved), so a link to a shared
    archive folder inside the site works while a link out of it does not.
    """
    base = Path(site_dir).resolve()
    text = str(rel).strip()
    if not text:
        raise UnsafePath("missing image_path")
    if "\0" in text:  # os.path.realpath would raise a bare ValueError
        raise UnsafePath(f"image path contains a NUL character: {text!r}")
    target = Path(os.path.realpath(base / text))  # an absolute path stays absolute and is checked like any other
    if target != base and base not in target.parents:
        raise UnsafePath(f"image path points outside the site folder: {text}")
    try:
        st = os.stat(target)
    except OSError:
        raise UnsafePath(f"image file not found: {target}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"not a regular file (a device, FIFO or folder): {text}")
    return target, st
