"""Real labeled data available offline: Fashion-MNIST from Debian's dataset-fashion-mnist."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import RebirthError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle boot"]


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR):
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the 'train' or 'test' split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise RebirthError(f"{images}: Fashion-MNIST not found; install it with "
                           "`apt-get install dataset-fashion-mnist`")
    return _idx(images), _idx(labels)
