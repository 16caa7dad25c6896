"""Lesion synthesis pipeline: region-of-interest sampling, background untouched bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.data.volume import Volume
from synthlesion.models import LesionDiffusionModel, ModelConfig
from synthlesion.pipelines.lesion_synthesis import (
    SCHEDULERS,
    LesionSynthesisPipeline,
    SynthesisError,
)

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])


def tiny_model(spatial_dims: int) -> LesionDiffusionModel:
    torch.manual_seed(0)
    config = ModelConfig(
        spatial_dims=spatial_dims,
        sample_size=16,
        channels=(8, 16),
        attention_levels=(False, False),
        layers_per_block=1,
        norm_num_groups=4,
        num_train_timesteps=100,
    )
    return LesionDiffusionModel.from_config(config)


def ct_scan(shape, seed=0):
    rng = np.random.default_rng(seed)
    image = (60 + rng.normal(0, 12, shape)).astype(np.int16)
    image[..., :2] = -1000
    return image


def lesion_at(shape, centre, radius):
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2).astype(
        np.uint8
    )


@pytest.fixture(scope="module")
def pipe2d():
    return LesionSynthesisPipeline(tiny_model(2), IntensityNormaliser.for_modality("CT"), (16, 16))


def test_outside_the_dilated_mask_is_bit_identical_and_dtype_kept(pipe2d):
    shape = (40, 36)
    image = Volume(ct_scan(shape), np.diag([0.8, 0.8, 1.0, 1.0]))
    target = lesion_at(shape, (12, 10), 3) + lesion_at(shape, (28, 25), 2)
    out = pipe2d(image, target, num_inference_steps=4, seed=1, dilation_mm=2.0)
    assert out.image.dtype == np.int16 and out.image.shape == shape
    distance_region = out.regions and len(out.regions) == 2
    assert distance_region
    from scipy import ndimage

    outside = ndimage.distance_transform_edt(target == 0, sampling=(0.8, 0.8)) > 2.0
    assert np.array_equal(out.image[outside], image.array[outside])
    assert not np.array_equal(out.image[target > 0], image.array[target > 0])
    assert out.image.min() >= image.array.min() and out.image.max() <= image.array.max()
    assert len(out.quality) == 2 and all(q.stats.voxels > 0 for q in out.quality)
    assert set(np.unique(out.lesion_mask)) == {0, 1}


def test_result_does_not_depend_on_batch_size(pipe2d):
    shape = (40, 36)
    image = Volume(ct_scan(shape), np.diag([0.8, 0.8, 1.0, 1.0]))
    target = lesion_at(shape, (12, 10), 3) + lesion_at(shape, (28, 25), 2)
    one = pipe2d(image, target, num_inference_steps=3, seed=5, batch_size=1, scheduler="ddpm")
    two = pipe2d(image, target, num_inference_steps=3, seed=5, batch_size=2, scheduler="ddpm")
    assert np.array_equal(one.image, two.image)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs(pipe2d, scheduler):
    shape = (24, 24)
    image = Volume(ct_scan(shape), np.diag([1.0, 1.0, 1.0, 1.0]))
    out = pipe2d(image, lesion_at(shape, (12, 12), 3), scheduler=scheduler, num_inference_steps=3)
    assert out.image.shape == shape


def test_resampling_jumps_need_a_stateless_scheduler(pipe2d):
    shape = (24, 24)
    image = Volume(ct_scan(shape), np.eye(4))
    target = lesion_at(shape, (12, 12), 3)
    assert (
        pipe2d(image, target, scheduler="ddim", num_inference_steps=2, resample_jumps=1).image.shape
        == shape
    )
    with pytest.raises(SynthesisError, match="resampling jumps"):
        pipe2d(image, target, scheduler="dpmsolver++", resample_jumps=1)


def test_lesion_at_the_scan_edge_is_padded(pipe2d):
    shape = (20, 20)
    image = Volume(ct_scan(shape), np.eye(4))
    target = lesion_at(shape, (1, 18), 2)
    out = pipe2d(image, target, num_inference_steps=2)
    assert out.regions[0].start[0] < 0  # the crop reaches outside the scan


def test_bad_inputs(pipe2d):
    image = Volume(ct_scan((24, 24)), np.eye(4))
    with pytest.raises(SynthesisError, match="does not fit"):
        pipe2d(image, np.zeros((20, 24), np.uint8))
    with pytest.raises(SynthesisError, match="empty"):
        pipe2d(image, np.zeros((24, 24), np.uint8))
    with pytest.raises(SynthesisError, match="fractional"):
        pipe2d(image, lesion_at((24, 24), (12, 12), 3) * 0.5)
    with pytest.raises(SynthesisError, match="region of interest"):
        pipe2d(image, lesion_at((24, 24), (12, 12), 10))
    with pytest.raises(SynthesisError, match="lesion classes"):
        pipe2d(image, lesion_at((24, 24), (12, 12), 3) * 3)
    volume3d = Volume(ct_scan((8, 8, 8)), np.eye(4))
    with pytest.raises(SynthesisError, match="3D scan for a 2D model"):
        pipe2d(volume3d, lesion_at((8, 8, 8), (4, 4, 4), 2))


@pytest.mark.slow
def test_3d_region_sampling():
    pipe = LesionSynthesisPipeline(
        tiny_model(3), IntensityNormaliser.for_modality("CT"), (16, 16, 16)
    )
    shape = (30, 28, 20)
    image = Volume(ct_scan(shape), AFFINE)
    target = lesion_at(shape, (15, 14, 10), 3)
    out = pipe(image, target, num_inference_steps=2, dilation_mm=2.0)
    from scipy import ndimage

    outside = ndimage.distance_transform_edt(target == 0, sampling=(0.8, 0.8, 2.0)) > 2.0
    assert np.array_equal(out.image[outside], image.array[outside])


def test_out_of_memory_halves_the_batch_and_keeps_every_region(pipe2d, monkeypatch, caplog):
    shape = (48, 48)
    image = Volume(ct_scan(shape), np.eye(4))
    target = sum(lesion_at(shape, c, 2) for c in [(8, 8), (8, 38), (38, 8), (38, 38), (24, 24)])
    reference = pipe2d(image, target, num_inference_steps=2, seed=3, batch_size=1)
    real_denoise = LesionSynthesisPipeline._denoise
    calls = []

    def flaky(self, crops, regions, *args):
        calls.append([r.index for r in regions])
        if len(crops) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_denoise(self, crops, regions, *args)

    monkeypatch.setattr(LesionSynthesisPipeline, "_denoise", flaky)
    out = pipe2d(image, target, num_inference_steps=2, seed=3, batch_size=8)
    assert calls[0] == [0, 1, 2, 3, 4] and calls[1] == [0, 1]  # half the failing chunk
    done = [i for c in calls if len(c) <= 2 for i in c]
    assert sorted(done) == [0, 1, 2, 3, 4]  # none skipped, none repeated
    assert np.array_equal(out.image, reference.image)

    def always(self, crops, regions, *args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    monkeypatch.setattr(LesionSynthesisPipeline, "_denoise", always)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(
            SynthesisError, match=r"out of CPU memory with one region of \[\d+, \d+\] voxels"
        ):
            pipe2d(image, target, num_inference_steps=2, batch_size=4)
    assert "batch size 4 is more than memory allows" in caplog.text

    # one region that does not fit is not retried at smaller "batch sizes"
    calls.clear()

    def counted(self, crops, regions, *args):
        calls.append(len(crops))
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(LesionSynthesisPipeline, "_denoise", counted)
    with pytest.raises(SynthesisError, match="one region"):
        pipe2d(image, lesion_at(shape, (24, 24), 2), num_inference_steps=2, batch_size=8)
    assert calls == [1]

    def other(self, crops, regions, *args):
        raise RuntimeError("CUDA error: out of memory")  # the context is gone: not retried

    monkeypatch.setattr(LesionSynthesisPipeline, "_denoise", other)
    with pytest.raises(RuntimeError, match="CUDA error"):
        pipe2d(image, target, num_inference_steps=2, batch_size=4)


def test_scale_to_training_per_array_axis_and_refusal_beyond_the_ratio() -> None:
    pipe = LesionSynthesisPipeline(
        tiny_model(3), IntensityNormaliser.for_modality("CT"), (16, 16, 16),
        train_spacing=(0.8, 0.8, 2.0),
    )  # fmt: skip
    same = Volume(ct_scan((8, 8, 8)), np.diag([0.805, 0.8, 2.0, 1.0]))
    assert pipe.scale_to_training(same) is None  # within 1 %: the scan as it is
    coarse = Volume(ct_scan((8, 8, 8)), np.diag([0.8, 0.8, 5.0, 1.0]))
    np.testing.assert_allclose(pipe.scale_to_training(coarse), [1.0, 1.0, 2.5])
    # the record's spacing is in RAS order: a scan stored with the slice axis first
    permuted = np.array([[0, 0, 0.8, 0], [0, 0.8, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    assert pipe.scale_to_training(Volume(ct_scan((8, 8, 8)), permuted)) is None
    far = Volume(ct_scan((8, 8, 8)), np.diag([0.8, 0.8, 10.0, 1.0]), source="scan.nii.gz")
    with pytest.raises(SynthesisError, match=r"scan.nii.gz.*5.0 times"):
        pipe.scale_to_training(far)


def test_a_finer_scan_is_painted_at_the_training_scale_and_stays_exact_outside() -> None:
    from scipy import ndimage

    pipe = LesionSynthesisPipeline(
        tiny_model(2), IntensityNormaliser.for_modality("CT"), (16, 16), train_spacing=(1.6, 1.6)
    )
    shape = (64, 60)
    image = Volume(ct_scan(shape), np.diag([0.8, 0.8, 1.0, 1.0]))  # twice as fine as training
    target = lesion_at(shape, (30, 28), 6)
    out = pipe(image, target, num_inference_steps=3, seed=2, dilation_mm=2.0)
    assert [r.size for r in out.regions] == [(31, 31)]  # 15 training voxels -> 30 scan voxels
    assert out.image.dtype == np.int16 and out.image.shape == shape
    near = ndimage.distance_transform_edt(target == 0, sampling=(0.8, 0.8)) <= 2.0 + 1e-6
    assert np.array_equal(out.image[~near], image.array[~near])
    assert not np.array_equal(out.image[target > 0], image.array[target > 0])
    # a lesion that fits the ROI only at the training scale is still refused when too big
    with pytest.raises(SynthesisError, match="training ROI"):
        pipe(image, lesion_at(shape, (30, 28), 17), num_inference_steps=2)


def test_training_spacing_comes_from_the_record_only_when_training_resampled(tmp_path) -> None:
    import json

    folder = tmp_path / "model"
    tiny_model(3).save_pretrained(folder)
    intensity = {"mode": "window", "window": [-200.0, 300.0], "percentiles": [0.5, 99.5]}
    for resampled, expected in ((True, (0.8, 0.8, 2.0)), (False, None)):
        data = {"intensity": intensity, "roi_size": [16, 16, 16], "spacing": [0.8, 0.8, 2.0],
                "spacing_resampled": resampled}  # fmt: skip
        (folder / "training_record.json").write_text(json.dumps({"data": data}))
        pipe = LesionSynthesisPipeline.from_pretrained(str(folder), max_spacing_ratio=3.0)
        assert pipe.train_spacing == expected and pipe.max_spacing_ratio == 3.0


def attribute_model() -> LesionDiffusionModel:
    torch.manual_seed(0)
    config = ModelConfig(
        spatial_dims=2, sample_size=16, channels=(8, 16), attention_levels=(False, False),
        layers_per_block=1, norm_num_groups=4, num_train_timesteps=100, num_attributes=2,
    )  # fmt: skip
    return LesionDiffusionModel.from_config(config)


def test_attribute_conditioned_model_samples_with_given_and_measured_attributes() -> None:
    names = ("volume_fraction", "mean_intensity")
    pipe = LesionSynthesisPipeline(
        attribute_model(), IntensityNormaliser.for_modality("CT"), (16, 16), attribute_names=names
    )
    shape = (40, 36)
    image = Volume(ct_scan(shape), np.diag([0.8, 0.8, 1.0, 1.0]))
    target = lesion_at(shape, (20, 18), 3)
    dark = pipe(image, target, num_inference_steps=3, seed=1, attributes={"mean_intensity": 20})
    bright = pipe(image, target, num_inference_steps=3, seed=1, attributes={"mean_intensity": 150})
    assert not np.array_equal(dark.image, bright.image)  # the attribute reaches the network
    assert dark.attributes[0]["mean_intensity"] < bright.attributes[0]["mean_intensity"]
    lesion_voxels = int((target > 0).sum())
    assert dark.attributes[0]["volume_fraction"] == pytest.approx(lesion_voxels / 16**2)
    fixed = pipe(image, target, num_inference_steps=3, seed=1,
                 attributes={"mean_intensity": 20, "volume_fraction": 0.5})  # fmt: skip
    assert fixed.attributes[0]["volume_fraction"] == 0.5
    with pytest.raises(SynthesisError, match="mean intensity"):
        pipe(image, target, num_inference_steps=2)  # no value and no real-lesion reference
    with pytest.raises(SynthesisError, match="not among"):
        pipe(image, target, num_inference_steps=2, attributes={"size": 3})
    with pytest.raises(SynthesisError, match="2 attribute"):
        LesionSynthesisPipeline(attribute_model(), pipe.normaliser, (16, 16))


def test_attribute_model_needs_its_attribute_names_in_the_record(tmp_path) -> None:
    import json

    folder = tmp_path / "model"
    attribute_model().save_pretrained(folder)
    intensity = {"mode": "window", "window": [-200.0, 300.0], "percentiles": [0.5, 99.5]}
    data = {"intensity": intensity, "roi_size": [16, 16]}
    (folder / "training_record.json").write_text(json.dumps({"data": data}))
    with pytest.raises(SynthesisError, match="does not name them"):
        LesionSynthesisPipeline.from_pretrained(str(folder))
    data["attributes"] = ["volume_fraction", "mean_intensity"]
    (folder / "training_record.json").write_text(json.dumps({"data": data}))
    pipe = LesionSynthesisPipeline.from_pretrained(str(folder))
    assert pipe.attribute_names == ("volume_fraction", "mean_intensity")


def test_cli_attribute_values() -> None:
    from synthlesion.cli import _attribute_values
    from synthlesion.errors import ConfigError

    assert _attribute_values([]) is None
    assert _attribute_values(["mean_intensity=80", "volume_fraction=0.1"]) == {
        "mean_intensity": 80.0, "volume_fraction": 0.1,
    }  # fmt: skip
    for bad in ("mean_intensity", "=3", "mean_intensity=high"):
        with pytest.raises(ConfigError, match="NAME=NUMBER"):
            _attribute_values([bad])
