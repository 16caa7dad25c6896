"""Model issue (4): conditioning, pixel backends (2D diffusers/MONAI, 3D MONAI), model folder.

Every network here is tiny (~10^4-10^5 parameters) on 16^2 / 8^3 inputs, CPU only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomise, single_torch_thread  # noqa: E402
from safetensors.torch import load_file

from synthlesion.config import load_config
from synthlesion.errors import ConfigError
from synthlesion.models import (
    CONTEXT_FILL_VALUE,
    BatchError,
    LesionDiffusionModel,
    ModelConfig,
    ModelFolderError,
    attribute_channels,
    dilate_mask,
    downsample_mask,
    empty_lesion,
    loss_weight_map,
    make_context,
)

TINY = dict(
    channels=(8, 16),
    attention_levels=(False, True),
    layers_per_block=1,
    norm_num_groups=4,
    attention_head_dim=4,
    num_train_timesteps=100,
)
VARIANTS = {
    "2d-diffusers": dict(spatial_dims=2, pixel_network="diffusers", sample_size=16),
    "2d-monai": dict(spatial_dims=2, pixel_network="monai"),
    "3d-monai": dict(spatial_dims=3),
}


one_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)


def make_config(variant: str = "2d-diffusers", **changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **VARIANTS[variant], **changes})


def make_model(variant: str = "2d-diffusers", seed: int = 0, **changes) -> LesionDiffusionModel:
    torch.manual_seed(seed)
    return LesionDiffusionModel.from_config(make_config(variant, **changes))


def make_batch(config: ModelConfig, batch_size: int = 2, seed: int = 0) -> dict:
    """A contract batch: a blob region with a lesion of class (b % K) inside it."""
    g = torch.Generator().manual_seed(seed)
    shape = (16, 16) if config.spatial_dims == 2 else (8, 8, 8)
    image = torch.rand((batch_size, 1, *shape), generator=g) * 2 - 1
    grid = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    dist = sum((x - s / 2) ** 2 for x, s in zip(grid, shape, strict=True)).sqrt()
    region = (dist < shape[0] / 3).float().expand(batch_size, 1, *shape).clone()
    lesion = torch.zeros((batch_size, config.lesion_classes, *shape))
    for b in range(batch_size):
        lesion[b, b % config.lesion_classes] = (dist < shape[0] / 5).float()
    batch = {"image": image, "region": region, "lesion": lesion}
    if config.num_class_embeds:
        batch["class_labels"] = torch.arange(batch_size) % config.num_class_embeds
    if config.num_attributes:
        batch["attributes"] = torch.rand((batch_size, config.num_attributes), generator=g)
    return batch


def noisy_like(model: LesionDiffusionModel, batch: dict, seed: int = 1):
    x0 = model.encode(batch["image"])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x0.shape, generator=g), torch.tensor([10, 70][: x0.shape[0]])


# ----------------------------------------------------------------------------- conditioning
def test_make_context_blanks_only_the_region():
    image = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    region = torch.zeros_like(image)
    region[..., 1:3, 1:3] = 1
    context = make_context(image, region)
    assert torch.all(context[region == 1] == CONTEXT_FILL_VALUE)
    assert torch.equal(context[region == 0], image[region == 0])


@pytest.mark.parametrize("shape", [(9, 9), (5, 5, 5)])
def test_dilate_mask_grows_by_radius_in_2d_and_3d(shape):
    mask = torch.zeros((1, 1, *shape))
    centre = tuple(s // 2 for s in shape)
    mask[(0, 0, *centre)] = 1
    grown = dilate_mask(mask, 1)
    assert grown.sum() == 3 ** len(shape)
    assert torch.equal(dilate_mask(mask, 0), mask)


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
def test_downsample_mask_keeps_binary_and_covers_every_pixel(shape):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand((2, 3, *shape), generator=g) > 0.9).float()
    small = downsample_mask(mask, 2)
    assert small.shape == (2, 3, *(s // 2 for s in shape))
    assert set(small.unique().tolist()) <= {0.0, 1.0}
    # every image pixel of the mask lies in a latent pixel of the mask
    up = small.repeat_interleave(2, 2).repeat_interleave(2, 3)
    if len(shape) == 3:
        up = up.repeat_interleave(2, 4)
    assert torch.all(up >= mask)
    with pytest.raises(BatchError, match="divisible"):
        downsample_mask(torch.zeros(1, 1, 6, 6), 4)


def test_loss_weight_map_weights_dilated_union():
    region = torch.zeros(1, 1, 8, 8)
    region[..., 3, 3] = 1
    lesion = torch.zeros(1, 2, 8, 8)
    lesion[0, 1, 5, 5] = 1
    w = loss_weight_map(region, lesion, lesion_weight=5.0, dilation=1)
    assert w.shape == (1, 1, 8, 8)
    assert set(w.unique().tolist()) == {1.0, 5.0}
    assert w[0, 0, 2, 2] == 5 and w[0, 0, 6, 6] == 5 and w[0, 0, 0, 0] == 1
    latent = loss_weight_map(region, lesion, 5.0, 0, factor=2)
    assert latent.shape == (1, 1, 4, 4) and latent[0, 0, 1, 1] == 5 and latent.sum() == 16 + 2 * 4


def test_attribute_channels_are_constant():
    attrs = torch.tensor([[0.5, -1.0]])
    channels = attribute_channels(attrs, (3, 4, 5))
    assert channels.shape == (1, 2, 3, 4, 5)
    assert torch.all(channels[0, 0] == 0.5) and torch.all(channels[0, 1] == -1.0)


def test_config_from_yaml_mapping_and_validation(tmp_path):
    cfg = load_config(
        ModelConfig,
        {
            "spatial_dims": 3,
            "channels": [8, 16],
            "attention_levels": [False, True],
            "norm_num_groups": 4,
        },
    )
    assert cfg.channels == (8, 16) and cfg.network == "monai"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ModelConfig, {"chanels": [8]})
    with pytest.raises(ConfigError, match="2D only"):
        ModelConfig(backend="latent_inpaint", spatial_dims=3, pretrained_path=str(tmp_path))
    with pytest.raises(ConfigError, match="pretrained_path"):
        ModelConfig(backend="controlnet")
    with pytest.raises(ConfigError, match="norm_num_groups"):
        ModelConfig(channels=(8, 12), attention_levels=(False, False), norm_num_groups=8)


def test_batch_errors_name_the_key():
    cfg = make_config(lesion_classes=2, num_class_embeds=3, num_attributes=1)
    model = make_model(lesion_classes=2, num_class_embeds=3, num_attributes=1)
    good = make_batch(cfg)
    with pytest.raises(BatchError, match="'region'"):
        model.training_loss({k: v for k, v in good.items() if k != "region"})
    with pytest.raises(BatchError, match="lesion_classes"):
        model.training_loss({**good, "lesion": good["lesion"][:, :1]})
    with pytest.raises(BatchError, match=r"\[0, 3\)"):
        model.training_loss({**good, "class_labels": torch.tensor([0, 3])})
    with pytest.raises(BatchError, match="attributes"):
        model.training_loss({**good, "attributes": torch.zeros(2, 4)})
    with pytest.raises(BatchError, match="spatial dims"):
        model.training_loss({**good, "image": good["image"][:, :, None]})


# ------------------------------------------------------------------------------ pixel models
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_uses_the_right_target_and_shapes(variant, prediction_type):
    """training_loss == MSE(predict(x_t), noise or scheduler.get_velocity) for the same draws."""
    model = make_model(variant, prediction_type=prediction_type)
    batch = make_batch(model.config)
    loss = model.training_loss(batch, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x0 = model.encode(batch["image"])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (2,), generator=g)
    sched = model.noise_scheduler
    target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    out = model.predict(sched.add_noise(x0, noise, t), t, batch)
    assert out.shape == target.shape == batch["image"].shape
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.mean((out - target) ** 2))


def test_lesion_weight_matches_a_manual_weighted_mse():
    model = make_model()
    batch = make_batch(model.config)
    loss = model.training_loss(
        batch, torch.Generator().manual_seed(4), lesion_weight=4.0, lesion_dilation=1
    )
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(batch["image"].shape, generator=g)
    t = torch.randint(0, 100, (2,), generator=g)
    out = model.predict(model.noise_scheduler.add_noise(batch["image"], noise, t), t, batch)
    w = 1 + 3 * dilate_mask(torch.maximum(batch["region"], batch["lesion"].amax(1, True)), 1)
    torch.testing.assert_close(loss, (w * (out - noise) ** 2).sum() / w.sum())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_overfits_a_fixed_batch(variant):
    model = make_model(variant, lesion_classes=2, num_class_embeds=2, num_attributes=2)
    batch = make_batch(model.config)
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.training_loss(
            batch, torch.Generator().manual_seed(0), lesion_weight=2.0, lesion_dilation=1
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_class_labels_attributes_and_masks_change_the_output(variant):
    model = make_model(variant, num_class_embeds=3, num_attributes=2).eval()
    randomise(model)
    batch = make_batch(model.config)
    noisy, t = noisy_like(model, batch)
    with torch.no_grad():
        base = model.predict(noisy, t, batch)
        other_class = model.predict(noisy, t, {**batch, "class_labels": torch.tensor([2, 2])})
        other_attr = model.predict(noisy, t, {**batch, "attributes": batch["attributes"] + 1})
        removal = model.predict(noisy, t, {**batch, "lesion": empty_lesion(batch["region"], 1)})
    for changed in (other_class, other_attr, removal):
        assert changed.shape == base.shape
        assert not torch.allclose(changed, base)


def test_trainable_parameters_are_all_of_a_pixel_unet():
    model = make_model()
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters()}


def test_forward_prepare_and_scalar_timesteps_agree():
    model = make_model("2d-monai", num_attributes=1).eval()
    batch = make_batch(model.config)
    noisy, _ = noisy_like(model, batch)
    with torch.no_grad():
        a = model.predict(noisy, 42, batch)
        b = model.predict(noisy, torch.tensor([42, 42]), model.prepare(batch))
    torch.testing.assert_close(a, b)
    as_double = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad():  # float64 batches are cast to the model's dtype
        torch.testing.assert_close(model.predict(noisy.double(), 42, as_double), a)
    g = torch.Generator
    torch.testing.assert_close(
        model(batch, g().manual_seed(1)), model.training_loss(batch, g().manual_seed(1))
    )


@pytest.mark.parametrize("variant", ["2d-diffusers", "3d-monai"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(variant):
    model = make_model(variant)
    batch = make_batch(model.config)
    loss = model.training_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    loss2 = model.training_loss(batch, torch.Generator().manual_seed(0))
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    for p, g in zip(model.trainable_parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------------ model folder
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_load_round_trip_gives_identical_outputs(variant, tmp_path):
    model = make_model(
        variant, num_class_embeds=2, num_attributes=1, prediction_type="v_prediction"
    ).eval()
    batch = make_batch(model.config)
    noisy, t = noisy_like(model, batch)
    record = {"manifest_sha256": "ab" * 32, "splits_sha256": "cd" * 32, "patients": ["p1"]}
    folder = model.save_pretrained(tmp_path / "model", training_record=record)
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_config.yaml",
        "scheduler",
        "training_record.json",
        "weights.safetensors",
    ]
    assert json.loads((folder / "training_record.json").read_text()) == record
    assert all(k.startswith("unet.") for k in load_file(folder / "weights.safetensors"))
    loaded = LesionDiffusionModel.from_pretrained(folder).eval()
    assert loaded.config == model.config
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    with torch.no_grad():
        assert torch.equal(loaded.predict(noisy, t, batch), model.predict(noisy, t, batch))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left


def test_sampling_schedulers_build_from_the_saved_config(tmp_path):
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
    )

    folder = make_model(prediction_type="v_prediction").save_pretrained(tmp_path / "m")
    for kind in (
        DDPMScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
    ):
        scheduler = kind.from_pretrained(folder / "scheduler")
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.num_train_timesteps == 100


def test_saving_replaces_a_model_but_never_an_unrelated_folder(tmp_path, monkeypatch):
    model = make_model()
    folder = model.save_pretrained(tmp_path / "m")
    model.save_pretrained(folder)  # replacing a model folder is fine
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="refusing to overwrite"):
        model.save_pretrained(other)

    def broken(_folder):
        raise OSError("disk full")

    monkeypatch.setattr(model.backend, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "photos"]
    assert LesionDiffusionModel.from_pretrained(folder) is not None  # old model intact


def test_loading_refuses_missing_files_pickles_and_strangers(tmp_path):
    folder = make_model().save_pretrained(tmp_path / "m")
    (folder / "weights.safetensors").rename(tmp_path / "w.safetensors")
    with pytest.raises(ModelFolderError, match="missing file.*weights.safetensors"):
        LesionDiffusionModel.from_pretrained(folder)
    (tmp_path / "w.safetensors").rename(folder / "weights.safetensors")

    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelFolderError, match="scheduler/scheduler_config.json"):
        LesionDiffusionModel.from_pretrained(folder)

    pickled = make_model().save_pretrained(tmp_path / "p")
    torch.save({"x": torch.zeros(1)}, pickled / "extra_weights.pt")
    with pytest.raises(ModelFolderError, match=r"extra_weights\.pt is a pickle"):
        LesionDiffusionModel.from_pretrained(pickled)

    stranger = tmp_path / "s"
    stranger.mkdir()
    with pytest.raises(ModelFolderError, match="not a synthlesion model folder"):
        LesionDiffusionModel.from_pretrained(stranger)
    with pytest.raises(ModelFolderError, match="no such model folder"):
        LesionDiffusionModel.from_pretrained(tmp_path / "nowhere")


def test_loading_refuses_weights_that_do_not_fit_the_config(tmp_path):
    folder = make_model().save_pretrained(tmp_path / "m")
    text = (
        (folder / "model_config.yaml").read_text().replace("lesion_classes: 1", "lesion_classes: 2")
    )
    (folder / "model_config.yaml").write_text(text)
    with pytest.raises(ModelFolderError, match="does not fit"):
        LesionDiffusionModel.from_pretrained(folder)


def test_healthy_pretraining_then_lesion_fine_tuning_share_one_model(tmp_path):
    """Self-supervised stage: random region, empty lesion; then lesions; same weights/folder."""
    model = make_model("2d-monai")
    healthy = make_batch(model.config)
    healthy["lesion"] = empty_lesion(healthy["region"], 1)
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    for batch in (healthy, make_batch(model.config, seed=1)):
        loss = model.training_loss(batch, torch.Generator().manual_seed(0))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    stage1 = model.save_pretrained(Path(tmp_path) / "stage1")
    again = LesionDiffusionModel.from_pretrained(stage1)
    assert torch.isfinite(again.training_loss(make_batch(again.config)))
