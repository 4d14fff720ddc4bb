"""The tiling contract of a model (its ``tiling`` property): how it may be cut into overlapping tiles.

Nothing here knows about training, Ray, W&B or data loading.
"""

from __future__ import annotations

from typing import NamedTuple


class Tiling(NamedTuple):
    """How a model may be run on overlapping tiles (``trainers/tiling.py``) with the whole image's result.

    ``halo``: receptive-field radius in pixels, exact (from the layer count and kernel sizes): an output
    pixel depends on no input pixel farther than ``halo`` along either axis, so a tile's output is the whole
    image's wherever it lies ``halo`` or more from the tile's cut edges. ``align``: the period of the model's
    sampling grid (its stride); tile origins must be multiples of it and tile sizes ≡ the image's modulo
    it, so that the strided grid and the size-dependent padding at the image border are the whole image's."""

    halo: int
    align: int
