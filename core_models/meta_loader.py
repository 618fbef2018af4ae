"""A DataLoader whose batches carry per-row metadata (A, S, C) next to images and labels.

The path-specific penalty (fairness/mitigation.py) needs each sample's sensitive attribute and mediator; batches are
``(x, y, meta)``. With the same seed the row order is the one ``make_loader`` gives (same sampler, same generator).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def make_meta_loader(images: np.ndarray, labels: np.ndarray, meta: np.ndarray, batch_size: int = 32,
                     shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of (images float32, labels int64, meta float32 (B, k)); ``meta`` has one row per image."""
    if len(meta) != len(labels):
        raise ValueError(f"{len(meta)} metadata rows for {len(labels)} images")
    dataset = TensorDataset(torch.tensor(images, dtype=torch.float32), torch.tensor(labels, dtype=torch.long),
                            torch.tensor(np.asarray(meta, dtype=np.float32)))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
