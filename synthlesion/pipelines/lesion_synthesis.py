"""Lesion synthesis: paint lesions into real scans inside target masks, touching nothing else.

The pipeline works on regions of interest: each target lesion gets a crop of the model's
training size around it, all crops go through the network as batches, and only the (dilated)
lesion region of each crop is pasted back. Outside the dilated masks the output equals the
input bit for bit, for every backend (the latent backend decodes, then blends in pixel space).
A scan of several channels (MRI sequences, CT phases; a list of volumes on one grid) is painted
jointly: the network sees and generates all channels, each normalised on its own, and every
channel is written back. With a placement region (a brain mask, the organ, the foreground) the
region to fill is clipped to it, so no voxel outside it changes.

Steps of ``__call__``:
    1. check the inputs;
    2. plan one region of interest per connected target lesion;
    3. normalise each crop to [-1, 1] as in training and build the conditioning batch;
    4. denoise every crop with the chosen scheduler, re-imposing the known region at each step
       (RePaint), in batches that halve on out-of-memory errors;
    5. decode, return to image units and paste back with a feather band inside the region;
    6. measure each lesion against the quality gate.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from synthlesion.config import check_device
from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.data.volume import Volume
from synthlesion.errors import SynthlesionError
from synthlesion.pipelines.quality import (
    QualityGate,
    QualityResult,
    RealLesionReference,
    evaluate_lesion,
)
from synthlesion.provenance.errors import GeneratorRecordError
from synthlesion.provenance.record import TrainingRecord

logger = logging.getLogger(__name__)

SCHEDULERS = ("dpmsolver++", "ddim", "unipc", "ddpm")
STATELESS_SCHEDULERS = ("ddim", "ddpm")  # resampling jumps need a scheduler without history


class SynthesisError(SynthlesionError):
    """The inputs of a synthesis run are unusable (mask does not fit, empty mask, ...)."""


def make_scheduler(name: str, config: Any):  # noqa: ANN201 - a diffusers scheduler
    """A diffusers sampling scheduler built from the model's training scheduler config.

    Args:
        name: ``"dpmsolver++"`` (default, about 20 steps), ``"ddim"``, ``"unipc"`` or ``"ddpm"``.
        config: The training scheduler's ``config`` (``model.noise_scheduler.config``).
    """
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
    )

    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    raise SynthesisError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


@dataclass(frozen=True)
class Region:
    """One region of interest: a crop of the scan around one target lesion.

    Attributes:
        index: Position of the lesion in the run (used to seed its noise).
        start: Corner of the crop in source voxels (may be negative at the scan's edge; the
            crop is padded there).
        size: Crop size in scan voxels: the model's ROI size, or the same physical extent at
            the scan's spacing when the ROI is resampled to the training spacing.
        lesion_class: 1-based lesion class of the target.
    """

    index: int
    start: tuple[int, ...]
    size: tuple[int, ...]
    lesion_class: int

    def slices(self, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(source slices, crop slices) of the part of the crop inside a scan of ``shape``."""
        src, dst = [], []
        for s, z, n in zip(self.start, self.size, shape, strict=True):
            lo, hi = max(s, 0), min(s + z, n)
            src.append(slice(lo, hi))
            dst.append(slice(lo - s, hi - s))
        return tuple(src), tuple(dst)


@dataclass(frozen=True)
class _LocalRegion:
    """One lesion's blend region in a box of the scan: global box slices and, inside it, the
    lesion, the region to fill and the paste weight (all shaped like the box)."""

    box: tuple[slice, ...]
    lesion: np.ndarray
    region: np.ndarray
    weight: np.ndarray


@dataclass
class LesionSynthesisOutput:
    """Result of one call.

    Attributes:
        images: The synthetic scan, one array per channel, each of the source channel's shape
            and dtype.
        lesion_mask: Target lesions painted (label values = lesion classes), shape ``S``.
        regions: The regions of interest used.
        quality: One quality record per region (never dropped).
        attributes: Per region, the attribute values the model was given (normalised as in
            training), for attribute-conditioned models.
    """

    images: list[np.ndarray]
    lesion_mask: np.ndarray
    regions: list[Region]
    quality: list[QualityResult] = field(default_factory=list)
    attributes: list[dict[str, float]] | None = None

    @property
    def image(self) -> np.ndarray:
        """The first channel (the whole scan for a one-channel source)."""
        return self.images[0]


class LesionSynthesisPipeline:
    """Mask-conditioned lesion synthesis with a trained :class:`LesionDiffusionModel`.

    Args:
        model: A trained model (``synthlesion.models.LesionDiffusionModel``).
        normaliser: Intensity normalisation used in training.
        roi_size: Crop size in voxels (the training crop size).
        device: Where to run the network.
        dtype: ``torch.float16``/``torch.bfloat16`` for autocast on a GPU, or ``None``.
        train_spacing: Voxel size (mm, RAS axis order) the model was trained at, when training
            resampled to one. A scan whose voxels differ from it by more than 1 % is handled
            at the training scale: each lesion's region of interest is resampled to the
            training spacing for the network (image linear, masks nearest) and the result
            resampled back before the paste, so lesions keep their physical size and texture
            and the scan outside the blend regions stays bit-identical. ``None``: no
            resampling.
        max_spacing_ratio: Largest ratio between scan and training voxel size on any axis
            (either way); beyond it the scan is refused (resampling cannot invent detail).
        attribute_names: The scalar attributes an attribute-conditioned model was trained
            with, in order (``volume_fraction``, ``mean_intensity``; from the record).
    """

    def __init__(
        self,
        model: Any,
        normaliser: IntensityNormaliser,
        roi_size: Sequence[int],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        reference: RealLesionReference | None = None,
        gate: QualityGate | None = None,
        train_spacing: Sequence[float] | None = None,
        max_spacing_ratio: float = 4.0,
        attribute_names: Sequence[str] = (),
    ) -> None:
        self.model = model.eval()
        self.train_spacing = tuple(float(s) for s in train_spacing) if train_spacing else None
        self.max_spacing_ratio = float(max_spacing_ratio)
        self.attribute_names = tuple(attribute_names)
        wanted = int(getattr(model.config, "num_attributes", 0) or 0)
        if wanted != len(self.attribute_names):
            raise SynthesisError(
                f"the model takes {wanted} attribute(s) but {len(self.attribute_names)} "
                f"attribute name(s) were given {list(self.attribute_names)} (a model folder's "
                "training record lists them)"
            )
        self.normaliser = normaliser
        self.roi_size = tuple(int(s) for s in roi_size)
        self.device = torch.device(check_device(str(device)))
        self.dtype = dtype
        self.reference = reference
        self.gate = gate or QualityGate()
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last) if len(self.roi_size) == 2 else None

    @classmethod
    def from_pretrained(cls, model_dir: str, **kwargs: Any) -> LesionSynthesisPipeline:
        """Load a model folder; normalisation, ROI size and (when training resampled to one)
        the training spacing come from its training record."""
        from synthlesion.models import LesionDiffusionModel

        model = LesionDiffusionModel.from_pretrained(model_dir)
        data = read_training_record(model_dir).data
        intensity = data.get("intensity")
        if intensity is None or "roi_size" not in data:
            raise SynthesisError(
                f"{model_dir}: training record has no data section (intensity, roi_size); "
                "it was not written by synthlesion training"
            )
        try:
            normaliser = IntensityNormaliser(
                mode=intensity["mode"],
                window=tuple(intensity["window"]),
                percentiles=tuple(intensity["percentiles"]),
                windows=tuple(tuple(w) for w in intensity.get("windows", [])),
            )
            roi_size = [int(v) for v in data["roi_size"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SynthesisError(
                f"{model_dir}: training record's data section is incomplete or malformed "
                f"(intensity, roi_size: {type(exc).__name__} {exc}); it was not written by "
                "synthlesion training, or was edited"
            ) from None
        if data.get("spacing_resampled") and data.get("spacing"):
            kwargs.setdefault("train_spacing", data["spacing"])
        if getattr(model.config, "num_attributes", 0) and "attributes" not in data:
            raise SynthesisError(
                f"{model_dir}: the model is conditioned on attributes but its training record "
                "does not name them (trained before synthlesion recorded them); retrain or add "
                'the "attributes" list to the record\'s data section'
            )
        kwargs.setdefault("attribute_names", data.get("attributes", ()))
        return cls(model, normaliser, roi_size, **kwargs)

    # -- step 1 -------------------------------------------------------------------------
    def check_inputs(
        self,
        channels: Sequence[Volume],
        lesion_mask: np.ndarray,
        organ_mask: np.ndarray | None,
        region_mask: np.ndarray | None = None,
    ) -> None:
        image = channels[0]
        want = int(self.model.config.image_channels)
        if len(channels) != want:
            raise SynthesisError(
                f"{image.source}: {len(channels)} image channel(s) for a model of {want}"
            )
        for other in channels[1:]:
            if other.shape != image.shape or not np.allclose(other.affine, image.affine, atol=1e-3):
                raise SynthesisError(
                    f"{other.source}: channel grid {other.shape} does not match {image.source} "
                    f"{image.shape} (channels must share one voxel grid)"
                )
        dims = self.model.config.spatial_dims
        if image.spatial_dims != dims:
            raise SynthesisError(f"{image.source}: {image.spatial_dims}D scan for a {dims}D model")
        if lesion_mask.shape != image.shape:
            raise SynthesisError(
                f"{image.source}: target mask shape {lesion_mask.shape} does not fit the image "
                f"shape {image.shape}"
            )
        if np.issubdtype(lesion_mask.dtype, np.floating) and np.any(
            lesion_mask != np.round(lesion_mask)
        ):
            raise SynthesisError(f"{image.source}: target mask holds fractional values")
        if not np.any(lesion_mask > 0):
            raise SynthesisError(f"{image.source}: target mask is empty")
        classes = int(self.model.config.lesion_classes)
        if lesion_mask.max() > classes or lesion_mask.min() < 0:
            raise SynthesisError(
                f"{image.source}: target mask values {np.unique(lesion_mask).tolist()} outside "
                f"0..{classes} (the model's lesion classes)"
            )
        if organ_mask is not None and organ_mask.shape != image.shape:
            raise SynthesisError(
                f"{image.source}: organ mask shape {organ_mask.shape} != {image.shape}"
            )
        if region_mask is not None:
            if region_mask.shape != image.shape:
                raise SynthesisError(
                    f"{image.source}: placement region shape {region_mask.shape} != {image.shape}"
                )
            outside = int(np.count_nonzero((lesion_mask > 0) & ~region_mask.astype(bool)))
            if outside:
                raise SynthesisError(
                    f"{image.source}: {outside} target lesion voxel(s) lie outside the placement "
                    "region"
                )

    def scale_to_training(self, image: Volume) -> np.ndarray | None:
        """Scan voxel size over training voxel size, per array axis; ``None`` when within 1 %
        (or no training spacing is known): the scan is used as it is.

        Raises:
            SynthesisError: a ratio beyond ``max_spacing_ratio``.
        """
        nd = image.spatial_dims
        if self.train_spacing is None or len(self.train_spacing) != nd:
            return None
        spacing = np.asarray(image.spacing[:nd], dtype=float)
        train = np.asarray(self.train_spacing, dtype=float)
        if nd == 3:  # the record holds RAS axes (training oriented to RAS)
            axes = nib.orientations.io_orientation(image.affine)[:, 0].astype(int)
            train = train[axes]
        factor = spacing / train
        if np.all(np.abs(factor - 1) <= 0.01):
            return None
        worst = float(np.max(np.maximum(factor, 1 / factor)))
        if worst > self.max_spacing_ratio:
            raise SynthesisError(
                f"{image.source}: voxel size {np.round(spacing, 3).tolist()} mm is {worst:.1f} "
                f"times the model's training spacing {np.round(train, 3).tolist()} mm (array "
                f"axes) on one axis (at most {self.max_spacing_ratio:g}); resample the scan "
                "closer to the training spacing first (masks nearest)"
            )
        return factor

    # -- step 2 -------------------------------------------------------------------------
    def plan_regions(
        self,
        lesion_mask: np.ndarray,
        spacing: Sequence[float],
        dilation_mm: float,
        feather_mm: float,
        factor: np.ndarray | None = None,
        region_mask: np.ndarray | None = None,
    ) -> list[tuple[Region, _LocalRegion]]:
        """One ROI per connected target lesion, centred on its blend region.

        With a ``factor`` (scan over training voxel size), the ROI covers the training ROI's
        physical extent: ``round((roi - 1) / factor) + 1`` scan voxels per axis.

        All work happens in a box around each lesion, so the cost follows the lesions, not the
        scan. A voxel of the blend region belongs to the nearest lesion. With a
        ``region_mask`` (the placement region) the blend region is clipped to it.

        Raises:
            SynthesisError: a lesion with its margin is larger than the model's ROI.
        """
        shape = lesion_mask.shape
        roi = self._scan_roi(factor)
        components, _ = ndimage.label(lesion_mask > 0)
        margin = [int(np.ceil(dilation_mm / s)) + 1 for s in spacing]
        planned = []
        for index, box in enumerate(ndimage.find_objects(components)):
            if box is None:
                continue
            ext = tuple(
                slice(max(b.start - m, 0), min(b.stop + m, n))
                for b, m, n in zip(box, margin, shape, strict=True)
            )
            comp = components[ext]
            mine = comp == index + 1
            d_mine = ndimage.distance_transform_edt(~mine, sampling=spacing)
            region = d_mine <= dilation_mm
            others = (comp > 0) & ~mine
            if others.any():
                region &= d_mine < ndimage.distance_transform_edt(~others, sampling=spacing)
            if region_mask is not None:
                region &= region_mask[ext].astype(bool) | mine
            inside = ndimage.distance_transform_edt(region, sampling=spacing)
            weight = np.clip(inside / feather_mm, 0, 1) if feather_mm > 0 else region.astype(float)
            weight[mine] = 1.0
            weight[~region] = 0.0
            rbox = ndimage.find_objects(region.astype(np.uint8))[0]
            glob = tuple(
                slice(e.start + r.start, e.start + r.stop) for e, r in zip(ext, rbox, strict=True)
            )
            extent = [g.stop - g.start for g in glob]
            if any(e > r for e, r in zip(extent, roi, strict=True)):
                raise SynthesisError(
                    f"target lesion {index} spans {extent} voxels (with its blend margin), more "
                    f"than the model's region of interest {list(roi)}"
                    + (
                        f" (the training ROI {list(self.roi_size)} at this scan's spacing)"
                        if factor is not None
                        else ""
                    )  # fmt: skip
                )
            centre = [(g.start + g.stop) // 2 for g in glob]
            start = tuple(c - r // 2 for c, r in zip(centre, roi, strict=True))
            values = lesion_mask[ext][mine]
            lesion_class = int(np.bincount(values.astype(np.int64)).argmax())
            local = _LocalRegion(glob, mine[rbox], region[rbox], weight[rbox])
            planned.append((Region(index, start, roi, lesion_class), local))
        return planned

    def _scan_roi(self, factor: np.ndarray | None) -> tuple[int, ...]:
        """The ROI in scan voxels (the training ROI itself when no resampling is needed)."""
        if factor is None:
            return self.roi_size
        return tuple(
            max(2, round((r - 1) / f) + 1) for r, f in zip(self.roi_size, factor, strict=True)
        )

    def __call__(
        self,
        image: Volume | Sequence[Volume],
        lesion_mask: np.ndarray,
        *,
        organ_mask: np.ndarray | None = None,
        region_mask: np.ndarray | None = None,
        scheduler: str = "dpmsolver++",
        num_inference_steps: int = 20,
        seed: int = 0,
        batch_size: int = 8,
        dilation_mm: float = 3.0,
        feather_mm: float = 1.5,
        resample_jumps: int = 0,
        prompt: str | None = None,
        attributes: Mapping[str, float] | None = None,
    ) -> LesionSynthesisOutput:
        """Paint the lesions of ``lesion_mask`` into ``image``.

        Args:
            image: Source scan (values in image units: HU for CT): one volume, or one volume
                per channel on one grid (as many as the model's ``image_channels``).
            lesion_mask: Target lesions, shape ``S``; 0 = none, k = lesion class k.
            organ_mask: Optional boolean organ map (for the quality ring).
            region_mask: Optional boolean placement region, shape ``S``: every target voxel
                must lie inside it, and the blend region is clipped to it (nothing outside it
                changes).
            scheduler: One of :data:`SCHEDULERS`.
            num_inference_steps: Denoising steps.
            seed: Base seed; region ``i`` uses its own generator seeded from ``(seed, i)``, so
                results do not depend on the batch size.
            batch_size: Regions per network call (halved on out-of-memory errors).
            dilation_mm: The region to fill is the lesion dilated by this margin (mm).
            feather_mm: Width of the blend band inside the region's edge (mm).
            resample_jumps: RePaint resampling jumps per step (DDPM and DDIM only).
            prompt: Text prompt for the latent backend.
            attributes: For an attribute-conditioned model: ``mean_intensity`` (the lesions'
                mean, in image units: HU for CT; default: the median of the real lesions of
                the reference) and optionally ``volume_fraction`` (default: measured from each
                target lesion in its region of interest, as in training).
        """
        # 1. inputs
        channels = [image] if isinstance(image, Volume) else list(image)
        if not channels:
            raise SynthesisError("no image channel given")
        image = channels[0]
        lesion_mask = np.asarray(lesion_mask)
        self.check_inputs(channels, lesion_mask, organ_mask, region_mask)
        if resample_jumps and scheduler not in STATELESS_SCHEDULERS:
            raise SynthesisError(f"resampling jumps need ddpm or ddim, not {scheduler}")
        attributes = dict(attributes or {})
        unknown = sorted(set(attributes) - set(self.attribute_names))
        if unknown:
            raise SynthesisError(
                f"attributes {unknown} are not among the model's {list(self.attribute_names)}"
            )
        sources = [c.array for c in channels]
        source = sources[0]
        # 2. regions (all further work is local to each lesion's box)
        factor = self.scale_to_training(image)
        planned = self.plan_regions(
            lesion_mask, image.spacing, dilation_mm, feather_mm, factor, region_mask
        )
        ranges = [self.normaliser.range_of(a, c) for c, a in enumerate(sources)]  # each its own
        value_range = ranges[0]
        # 3. crops and conditioning (each crop sees only its own lesion and region)
        crops = [self._crop_inputs(sources, lesion_mask, r, local, ranges) for r, local in planned]
        if factor is not None:  # to the training scale: image linear, masks nearest
            crops = [
                (np.stack([_resize(c, self.roi_size, 1) for c in im]),
                 _resize(fill, self.roi_size, 0),
                 np.stack([_resize(channel, self.roi_size, 0) for channel in lesion]))
                for im, fill, lesion in crops
            ]  # fmt: skip
        regions = [r for r, _ in planned]
        # 4. denoising, in batches that halve on out-of-memory errors
        attribute_values = (
            [self._attributes(crop, attributes, value_range) for crop in crops]
            if self.attribute_names
            else None
        )
        generated = self._run_batches(
            crops, regions, scheduler, num_inference_steps, seed, batch_size, resample_jumps,
            prompt, attribute_values,
        )  # fmt: skip
        if factor is not None:  # back to the scan's grid before the paste
            generated = [
                np.stack([_resize(c, r.size, 1) for c in g])
                for g, r in zip(generated, regions, strict=True)
            ]
        # 5. paste back every channel: weight 1 on the lesion, a feather band at the region's
        #    edge, 0 outside (each channel in its own units and dtype, clipped to its range)
        outputs = self._paste_back(sources, ranges, planned, generated)
        # 6. quality gates (on the first channel), measured in each region of interest
        quality = self._gates(source, outputs[0], planned, image.spacing, organ_mask)
        painted = np.where(lesion_mask > 0, lesion_mask, 0).astype(np.uint8)
        return LesionSynthesisOutput(outputs, painted, regions, quality, attribute_values)

    # -- helpers ------------------------------------------------------------------------
    def _paste_back(
        self,
        sources: Sequence[np.ndarray],
        ranges: Sequence[Any],
        planned: Sequence[tuple[Region, _LocalRegion]],
        generated: Sequence[np.ndarray],
    ) -> list[np.ndarray]:
        """Every channel with the generated regions blended in (step 5)."""
        outputs = []
        for c, (array, channel_range) in enumerate(zip(sources, ranges, strict=True)):
            output = array.copy()
            low, high = float(array.min()), float(array.max())
            for (region, local), crop in zip(planned, generated, strict=True):
                in_roi = _shift(local.box, region.start)
                values = self.normaliser.denormalise(crop[c][in_roi], channel_range)
                w = local.weight
                blended = np.clip(array[local.box] * (1 - w) + values * w, low, high)
                if np.issubdtype(array.dtype, np.integer):
                    blended = np.rint(blended)
                target = output[local.box]
                target[local.region] = blended[local.region].astype(array.dtype)
            outputs.append(output)
        return outputs

    def _gates(
        self,
        source: np.ndarray,
        output: np.ndarray,
        planned: Sequence[tuple[Region, _LocalRegion]],
        spacing: Sequence[float],
        organ_mask: np.ndarray | None,
    ) -> list[QualityResult]:
        """The quality gate of every lesion, each measured in its region of interest (step 6)."""
        quality = []
        for region, local in planned:
            roi, _ = region.slices(output.shape)
            lesion_roi = np.zeros(output[roi].shape, dtype=bool)
            region_roi = np.zeros_like(lesion_roi)
            offset = _shift(local.box, [r.start for r in roi])
            lesion_roi[offset] = local.lesion
            region_roi[offset] = local.region
            quality.append(
                evaluate_lesion(
                    source[roi],
                    output[roi],
                    lesion_roi,
                    region_roi,
                    spacing,
                    self.reference,
                    self.gate,
                    tissue=organ_mask[roi] if organ_mask is not None else None,
                )
            )
        return quality

    def _attributes(
        self, crop: tuple[np.ndarray, ...], given: Mapping[str, float], value_range: Any
    ) -> dict[str, float]:
        """One region's attribute values, normalised as the training crops' were."""
        _, fill, lesion = crop
        inside = lesion.max(axis=0) > 0  # mean_intensity is the first channel's, as in training
        out: dict[str, float] = {}
        for name in self.attribute_names:
            if name == "volume_fraction":
                out[name] = float(given.get(name, inside.mean()))
            elif name == "mean_intensity":
                if name in given:
                    level = float(given[name])
                elif self.reference is not None and self.reference.means:
                    level = float(np.median(self.reference.means))
                else:
                    raise SynthesisError(
                        "the model is conditioned on the lesions' mean intensity: give it "
                        "(attributes={'mean_intensity': value in image units}) or a reference "
                        "of real lesions"
                    )
                normalised = self.normaliser.normalise(np.array([level]), value_range)
                out[name] = float(np.asarray(normalised).reshape(-1)[0])
            else:
                raise SynthesisError(f"unknown attribute {name!r} in the model's record")
        return out

    def _crop_inputs(self, arrays, lesion_mask, region: Region, local: _LocalRegion, ranges):  # noqa: ANN001, ANN202
        src, dst = region.slices(arrays[0].shape)
        image = np.full((len(arrays), *region.size), -1.0, dtype=np.float32)
        for c, (array, value_range) in enumerate(zip(arrays, ranges, strict=True)):
            image[c][dst] = self.normaliser.normalise(array[src], value_range)
        in_roi = _shift(local.box, region.start)
        fill = np.zeros(region.size, dtype=np.float32)
        fill[in_roi] = local.region
        classes = int(self.model.config.lesion_classes)
        lesion = np.zeros((classes, *region.size), dtype=np.float32)
        values = lesion_mask[local.box]
        for k in range(classes):
            lesion[k][in_roi] = local.lesion & (values == k + 1)
        return image, fill, lesion

    def _run_batches(self, crops, regions, scheduler_name, steps, seed, batch_size, jumps, prompt,
                     attributes=None):  # noqa: ANN001, ANN202  # fmt: skip
        results: list[np.ndarray | None] = [None] * len(crops)
        start = 0
        size = max(1, int(batch_size))
        while start < len(crops):
            chunk = list(range(start, min(start + size, len(crops))))
            try:
                out = self._denoise(
                    [crops[i] for i in chunk],
                    [regions[i] for i in chunk],
                    scheduler_name,
                    steps,
                    seed,
                    jumps,
                    prompt,
                    [attributes[i] for i in chunk] if attributes is not None else None,
                )
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not _out_of_memory(exc):
                    raise
                where = "GPU" if self.device.type == "cuda" else f"{self.device.type.upper()}"
                if len(chunk) == 1:
                    raise SynthesisError(
                        f"out of {where} memory with one region of {list(crops[chunk[0]][0].shape[1:])} "
                        f"voxels per network call on {self.device}: free memory (other jobs on "
                        "the device), use a device with more memory, or a model with a smaller "
                        "region of interest"
                    ) from None
                size = max(1, min(size, len(chunk)) // 2)
                logger.warning(
                    "out of %s memory with %d regions per network call (batch size %d is more "
                    "than memory allows): retrying regions %d-%d with %d per call",
                    where, len(chunk), batch_size, chunk[0], chunk[-1], size,
                )  # fmt: skip
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            for i, array in zip(chunk, out, strict=True):
                results[i] = array
            start += len(chunk)
        return results

    @torch.no_grad()
    def _denoise(self, crops, regions, scheduler_name, steps, seed, jumps, prompt, attributes=None):  # noqa: ANN001, ANN202
        model = self.model
        device = self.device
        batch = {
            "image": torch.from_numpy(np.stack([c[0] for c in crops])).to(device),
            "region": torch.from_numpy(np.stack([c[1] for c in crops]))[:, None].to(device),
            "lesion": torch.from_numpy(np.stack([c[2] for c in crops])).to(device),
        }
        if getattr(model.config, "num_class_embeds", None):
            batch["class_labels"] = torch.tensor(
                [r.lesion_class - 1 for r in regions], device=device
            )
        if prompt is not None:
            batch["prompt"] = [prompt] * len(crops)
        if attributes is not None:
            batch["attributes"] = torch.tensor(
                [[a[name] for name in self.attribute_names] for a in attributes],
                dtype=torch.float32,
                device=device,
            )
        cond = model.prepare(batch)
        generators = [
            torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + r.index) for r in regions
        ]
        sched = make_scheduler(scheduler_name, model.noise_scheduler.config)
        # stochastic steps draw per-region noise, so results do not depend on the batching
        step_kwargs = {"generator": generators} if scheduler_name == "ddpm" else {}
        sched.set_timesteps(steps, device=device)
        known = model.encode(batch["image"])
        from synthlesion.models.conditioning import downsample_mask  # diffusers: import late

        region = downsample_mask(batch["region"], model.latent_factor)
        noise = torch.stack([torch.randn(known.shape[1:], generator=g) for g in generators]).to(
            device, known.dtype
        )
        x = noise * sched.init_noise_sigma
        timesteps = list(sched.timesteps)
        autocast = (
            torch.autocast(device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        for i, t in enumerate(timesteps):
            for jump in range(jumps + 1):
                model_in = sched.scale_model_input(x, t)
                with autocast:
                    pred = model.predict(model_in, t.expand(len(crops)).to(device), cond)
                x = sched.step(pred.float(), t, x, **step_kwargs).prev_sample
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
                # RePaint: outside the region, the known image at the next noise level
                if t_prev is not None:
                    fresh = torch.stack(
                        [torch.randn(known.shape[1:], generator=g) for g in generators]
                    ).to(device, known.dtype)
                    x = region * x + (1 - region) * sched.add_noise(known, fresh, t_prev.reshape(1))
                else:
                    x = region * x + (1 - region) * known
                if jump < jumps and t_prev is not None:
                    x = _renoise(sched, x, t, t_prev, generators)
        decoded = model.decode(x).float().clamp(-1, 1)
        return [d.cpu().numpy() for d in decoded]


def read_training_record(model_dir: str | Path) -> TrainingRecord:
    """The model folder's training record; a model without a readable one is refused."""
    try:
        return TrainingRecord.read(model_dir)
    except GeneratorRecordError as exc:
        raise SynthesisError(str(exc)) from None


def _out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error, or the CPU allocator's (a ``RuntimeError`` naming it)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # the CPU allocator's words; "CUDA error: out of memory" is not retried (the context is
    # unusable after it), only torch's OutOfMemoryError is
    text = str(exc).lower()
    return "cpuallocator" in text and (
        "can't allocate memory" in text or "not enough memory" in text
    )


def _shift(box: Sequence[slice], origin: Sequence[int]) -> tuple[slice, ...]:
    """Slices ``box`` (scan coordinates) expressed relative to ``origin``."""
    return tuple(slice(b.start - o, b.stop - o) for b, o in zip(box, origin, strict=True))


def _renoise(sched, x, t, t_prev, generators):  # noqa: ANN001, ANN202
    """One forward diffusion step from ``t_prev`` back to ``t`` (RePaint resampling)."""
    alphas = sched.alphas_cumprod.to(x.device)
    ratio = alphas[int(t)] / alphas[int(t_prev)]
    noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(
        x.device, x.dtype
    )
    return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


def _resize(array: np.ndarray, size: Sequence[int], order: int) -> np.ndarray:
    """Resample a crop to ``size`` with corners on corners (order 1 linear, 0 nearest)."""
    if tuple(array.shape) == tuple(size):
        return array
    factors = [m / n for m, n in zip(size, array.shape, strict=True)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=False)
    return out.astype(array.dtype, copy=False)
