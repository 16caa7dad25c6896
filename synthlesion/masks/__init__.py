"""Target lesion masks for synthesis: where a new lesion goes and what shape it has.

Three sources, one placement rule:

* :class:`MaskBank`: lesions cut from real training cases and transplanted into other scans
  (random rotation, scaling and elastic jitter, always nearest-neighbour on the mask);
* :func:`procedural_mask`: smoothly deformed ellipsoids, sizes drawn from the real lesions';
* user masks, read from a file and checked against the target scan's grid.

:class:`PlacementConstraint` says where a lesion may go: inside a tissue or organ label (or an
intensity range), away from existing lesions and from the organ's border.
"""

from __future__ import annotations

from synthlesion.masks.placement import PlacementConstraint, PlacementError, place_mask
from synthlesion.masks.shapes import (
    BankLesion,
    MaskBank,
    jitter_mask,
    procedural_mask,
)

__all__ = [
    "BankLesion",
    "MaskBank",
    "PlacementConstraint",
    "PlacementError",
    "jitter_mask",
    "place_mask",
    "procedural_mask",
]
