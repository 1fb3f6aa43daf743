"""scikit-learn's 8x8 digits as 32x32 single-channel images in [-1, 1], with a fixed held-out split."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
NUM_CLASSES = 10
# The held-out split is part of the metric's definition: fixed seed, fixed fraction, stratified.
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits, bilinearly upsampled to 32x32 and scaled to [-1, 1]; returns (images, labels)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    return images.contiguous(), torch.from_numpy(data.target.astype(np.int64))


def train_heldout_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (held-out images, labels)) — the split the classifier's accuracy is reported on."""
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_images()
    train_idx, heldout_idx = train_test_split(
        np.arange(len(labels)), test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=labels.numpy()
    )
    train_idx, heldout_idx = torch.from_numpy(train_idx), torch.from_numpy(heldout_idx)
    return (images[train_idx], labels[train_idx]), (images[heldout_idx], labels[heldout_idx])
