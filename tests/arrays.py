"""Array stand-ins shared by tests."""

from __future__ import annotations

import numpy as np


class RecordingArray:
    """A numpy array behind ``__getitem__`` only, recording the shape of every block read."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.read_shapes: list[tuple[int, ...]] = []

    def __getitem__(self, key):
        block = self.array[key]
        self.read_shapes.append(block.shape)
        return block
