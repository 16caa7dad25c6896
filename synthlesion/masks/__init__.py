"""Target lesion masks for synthesis: where a new lesion goes and what shape it has.

Three sources, one placement rule:

* :class:`MaskBank`: lesions cut from real training cases and transplanted into other scans
  (random rotation, scaling and elastic jitter, always nearest-neighbour on the mask);
* :func:`procedural_mask`: smoothly deformed ellipsoids, sizes drawn from the real lesions';
* user masks, read from a file and checked against the target scan's grid.

:func:`placement_region` resolves where lesions may go in a scan (a user's region mask or label,
else the organ labels, else the scan's foreground; never the whole volume);
:class:`PlacementConstraint` keeps them away from existing lesions and from the region's border.
"""

from __future__ import annotations

from synthlesion.masks.placement import (
    PlacementConstraint,
    PlacementError,
    PlacementRegion,
    keep_away,
    place_mask,
    placement_region,
)
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
    "PlacementRegion",
    "jitter_mask",
    "keep_away",
    "place_mask",
    "placement_region",
    "procedural_mask",
]
