"""Use synthlesion transforms on TorchIO subjects.

MONAI dicts need no adapter: the transforms take ``LoadImaged`` output as it is (MetaTensors
or ``<key>_meta_dict`` entries), read the spacing from the affine, and keep the affine up to
date after spatial transforms. A TorchIO :class:`torchio.Subject` goes through
:class:`TorchIOAdapter`::

    pipeline = TorchIOAdapter(recipes.multisite_mri("t1", "seg"))
    subject = pipeline(subject)  # images, label maps and affines updated

TorchIO is optional (``pip install synthlesion[bench]`` installs it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from synthlesion.augment.base import SPACING_KEY, AugmentationError


def _torchio() -> Any:
    try:
        import torchio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AugmentationError(
            "TorchIO is not installed (pip install torchio)", transform="TorchIOAdapter"
        ) from exc
    return torchio


def subject_to_dict(subject: Any) -> dict[str, Any]:
    """A TorchIO subject as a synthlesion item: each image ``(C, X, Y, Z)`` under its name,
    its affine in ``<name>_meta_dict``, the spacing (mm) of the first image, and every other
    entry of the subject (scalar labels, ids) as it is."""
    tio = _torchio()
    if not isinstance(subject, tio.Subject):
        raise AugmentationError(
            f"expected a torchio.Subject, got {type(subject).__name__}", transform="TorchIOAdapter"
        )
    item: dict[str, Any] = {}
    spacing = None
    for name, value in subject.items():
        if isinstance(value, tio.Image):
            data = value.data
            if isinstance(value, tio.LabelMap) and data.is_floating_point():
                if not bool(torch.equal(data, data.round())):
                    raise AugmentationError(
                        "a LabelMap with fractional values: not a label map",
                        key=name,
                        transform="TorchIOAdapter",
                    )
                data = data.to(torch.int64)  # TorchIO may hold label maps as floats
            elif not isinstance(value, tio.LabelMap) and not data.is_floating_point():
                data = data.to(torch.float32)  # int16 scans (CT in HU, MRI) as TorchIO reads
            item[name] = data
            item[f"{name}_meta_dict"] = {"affine": np.asarray(value.affine, dtype=np.float64)}
            if spacing is None:
                spacing = tuple(float(s) for s in value.spacing)
        else:
            item[name] = value
    if spacing is not None:
        item[SPACING_KEY] = spacing
    return item


def dict_to_subject(item: Mapping[str, Any], like: Any) -> Any:
    """The subject ``like`` with its images replaced by ``item``'s tensors and affines."""
    tio = _torchio()
    fields: dict[str, Any] = {}
    for name, value in like.items():
        if isinstance(value, tio.Image):
            data = item[name]
            if isinstance(data, list):
                raise AugmentationError(
                    "a crop turned the subject into several; use it outside the adapter",
                    key=name,
                    transform="TorchIOAdapter",
                )
            tensor = torch.as_tensor(data).as_subclass(torch.Tensor)
            affine = np.asarray(item.get(f"{name}_meta_dict", {}).get("affine", value.affine))
            fields[name] = type(value)(tensor=tensor, affine=affine)
        else:
            fields[name] = item.get(name, value)
    return tio.Subject(**fields)


class TorchIOAdapter:
    """Run a synthlesion transform (or :class:`Compose`) on TorchIO subjects.

    Args:
        transform: Takes and returns a MONAI-style dict of items ``(C, *spatial)``; its
            ``spatial_dims`` must be 3 (TorchIO images are 3D; 2D images are ``Z = 1``).
    """

    def __init__(self, transform: Callable[[dict[str, Any]], Any]) -> None:
        self.transform = transform

    def __call__(self, subject: Any) -> Any:
        item = subject_to_dict(subject)
        out = self.transform(item)
        if isinstance(out, list):
            raise AugmentationError(
                f"the transform turned the subject into {len(out)} crops (crop by label); a "
                "TorchIO subject holds one: crop outside the adapter (e.g. tio.LabelSampler)",
                transform="TorchIOAdapter",
            )
        return dict_to_subject(out, subject)
