"""Model issue (4), latent backends: SD-inpainting-layout fine-tuning and ControlNet.

A tiny diffusers-layout folder (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, an offline
CLIPTokenizer, a PNDM scheduler config like Stable Diffusion's) is built in a temp folder and
loaded through the same ``from_pretrained(local_path)`` calls a user with real weights makes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomise, single_torch_thread  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from synthlesion.models import (
    BatchError,
    LesionDiffusionModel,
    ModelConfig,
    ModelFolderError,
    downsample_mask,
)

LATENT = 4
MERGES = [
    "l e",
    "le s",
    "les i",
    "o n</w>",
    "lesi on</w>",
    "h y",
    "hy p",
    "e r</w>",
    "i v",
    "l iv",
    "liv er</w>",
]


one_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [256 + i for i in range(256 - len(keep))]
    return [chr(c) for c in keep + extra]


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer from a hand-written vocab.json + merges.txt (no download)."""
    folder.mkdir(parents=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=16
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_tiny_sd_folder(root: Path, unet_in_channels: int = 2 * LATENT + 1) -> Path:
    """unet/ vae/ text_encoder/ tokenizer/ scheduler/ like runwayml/stable-diffusion-inpainting."""
    torch.manual_seed(0)
    tokenizer = write_tokenizer(root / "tokenizer")
    UNet2DConditionModel(
        sample_size=8,
        in_channels=unet_in_channels,
        out_channels=LATENT,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
    ).save_pretrained(root / "unet", safe_serialization=True)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(root / "vae", safe_serialization=True)
    CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=len(tokenizer),
            max_position_embeddings=16,
            projection_dim=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).save_pretrained(root / "text_encoder")
    PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    ).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return write_tiny_sd_folder(tmp_path_factory.mktemp("sd-inpaint"))


@pytest.fixture(scope="module")
def sd_plain_folder(tmp_path_factory) -> Path:
    """A text-to-image (4 input channels) UNet, as under most ControlNets."""
    return write_tiny_sd_folder(tmp_path_factory.mktemp("sd-plain"), unet_in_channels=LATENT)


def make_model(
    folder: Path, backend: str = "latent_inpaint", seed: int = 0, **changes
) -> LesionDiffusionModel:
    torch.manual_seed(seed)
    config = ModelConfig(backend=backend, pretrained_path=str(folder), **changes)
    return LesionDiffusionModel.from_config(config)


def make_batch(config: ModelConfig, batch_size: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((batch_size, config.image_channels, 16, 16), generator=g) * 2 - 1
    region = torch.zeros((batch_size, 1, 16, 16))
    region[..., 4:12, 3:11] = 1
    lesion = torch.zeros((batch_size, config.lesion_classes, 16, 16))
    lesion[:, 0, 5:9, 5:9] = 1
    batch = {
        "image": image,
        "region": region,
        "lesion": lesion,
        "prompt": ["hyperdense lesion, right liver lobe", "hypodense lesion"][:batch_size],
    }
    if config.num_class_embeds:
        batch["class_labels"] = torch.arange(batch_size) % config.num_class_embeds
    if config.num_attributes:
        batch["attributes"] = torch.rand((batch_size, config.num_attributes), generator=g)
    return batch


def noisy_like(model: LesionDiffusionModel, batch: dict):
    x0 = model.encode(batch["image"])
    return torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 800])


# ---------------------------------------------------------------------------------- folder
def test_offline_tokenizer_tokenizes_a_prompt(sd_folder):
    tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    ids = tokenizer("hyperdense lesion, right liver lobe").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "lesion</w>" in tokens and "liver</w>" in tokens and "hyp" in tokens


def test_loads_pretrained_components_and_widens_conv_in(sd_folder):
    model = make_model(sd_folder, lesion_classes=2, num_attributes=1, num_class_embeds=3)
    unet = model.backend.unet
    assert unet.config.in_channels == 2 * LATENT + 1 + 2 + 1
    assert model.latent_factor == 2 and model.x0_channels == LATENT
    # the noise schedule comes from the checkpoint, the prediction type from the config
    assert model.config.beta_schedule == "scaled_linear" and model.config.beta_end == 0.012
    assert model.noise_scheduler.config.steps_offset == 1
    assert not model.noise_scheduler.config.clip_sample


def test_new_channels_and_class_embedding_start_at_zero_effect(sd_folder):
    """Widened conv_in and the class embedding leave the pretrained UNet's output unchanged."""
    model = make_model(sd_folder, lesion_classes=2, num_attributes=1, num_class_embeds=3).eval()
    original = UNet2DConditionModel.from_pretrained(sd_folder / "unet").eval()
    batch = make_batch(model.config)
    noisy, t = noisy_like(model, batch)
    cond = model.prepare(batch)
    with torch.no_grad():
        ours = model.predict(noisy, t, cond)
        x = torch.cat([noisy, cond.spatial[:, : LATENT + 1]], dim=1)
        theirs = original(x, t, cond.text).sample
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target_shapes_and_latent_weights(sd_folder, prediction_type):
    model = make_model(sd_folder, prediction_type=prediction_type)
    batch = make_batch(model.config)
    loss = model.training_loss(batch, torch.Generator().manual_seed(2), lesion_weight=3.0)
    g = torch.Generator().manual_seed(2)
    x0 = model.encode(batch["image"], generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    sched = model.noise_scheduler
    target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    out = model.predict(sched.add_noise(x0, noise, t), t, batch)
    assert out.shape == target.shape == (2, LATENT, 8, 8)
    w = 1 + 2 * downsample_mask(batch["region"], 2)
    torch.testing.assert_close(loss, (w * (out - target) ** 2).sum() / (w.sum() * LATENT))


def test_prepared_masks_are_binary_at_latent_resolution(sd_folder):
    model = make_model(sd_folder, lesion_classes=2)
    batch = make_batch(model.config)
    batch["region"] = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.8
    batch["region"] = batch["region"].float()
    spatial = model.prepare(batch).spatial
    region, lesion = spatial[:, :1], spatial[:, 1 + LATENT :]
    assert region.shape == (2, 1, 8, 8) and lesion.shape == (2, 2, 8, 8)
    for mask in (region, lesion):
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(region, downsample_mask(batch["region"], 2))


def test_grayscale_goes_to_the_vae_as_float(sd_folder, monkeypatch):
    model = make_model(sd_folder)
    seen = {}
    encode = model.backend.vae.encode

    def spy(x, *args, **kwargs):
        seen["x"] = x
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(model.backend.vae, "encode", spy)
    image = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    model.encode(image)
    assert seen["x"].dtype == torch.float32 and seen["x"].shape == (1, 3, 16, 16)
    assert torch.equal(seen["x"][:, 1], image[:, 0])  # no 8-bit quantisation
    assert model.decode(model.encode(image)).shape == (1, 1, 16, 16)
    with pytest.raises(BatchError, match="divisible"):
        model.encode(torch.zeros(1, 1, 15, 16))


# ----------------------------------------------------------------------- training behaviour
@pytest.mark.parametrize("backend", ["latent_inpaint", "controlnet"])
def test_only_trainable_parameters_get_gradients(sd_folder, backend):
    model = make_model(sd_folder, backend, num_class_embeds=2, num_attributes=1)
    b = model.backend
    trained = b.unet if backend == "latent_inpaint" else b.controlnet
    frozen = [b.vae, b.text_encoder] + ([b.unet] if backend == "controlnet" else [])
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in trained.parameters()}
    model.train()
    assert not any(m.training for m in frozen) and trained.training
    model.training_loss(make_batch(model.config), torch.Generator().manual_seed(0)).backward()
    for module in frozen:
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())


@pytest.mark.parametrize("backend", ["latent_inpaint", "controlnet"])
def test_overfits_a_fixed_batch(sd_folder, backend):
    model = make_model(sd_folder, backend, num_class_embeds=2, num_attributes=1)
    batch = make_batch(model.config)
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
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
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("backend", ["latent_inpaint", "controlnet"])
def test_prompt_class_attributes_and_masks_change_the_output(sd_folder, backend):
    model = make_model(sd_folder, backend, num_class_embeds=3, num_attributes=2).eval()
    randomise(model.backend.unet if backend == "latent_inpaint" else model.backend.controlnet)
    batch = make_batch(model.config)
    noisy, t = noisy_like(model, batch)
    cases = {
        "prompt": {"prompt": ["hypodense lesion", "hyperdense lesion, right liver lobe"]},
        "class": {"class_labels": torch.tensor([2, 2])},
        "attributes": {"attributes": batch["attributes"] + 1},
        "removal": {"lesion": torch.zeros_like(batch["lesion"])},
    }
    with torch.no_grad():
        base = model.predict(noisy, t, batch)
        for name, change in cases.items():
            assert not torch.allclose(model.predict(noisy, t, {**batch, **change}), base), name


def test_controlnet_on_a_text_to_image_base_sees_the_context(sd_plain_folder):
    model = make_model(sd_plain_folder, "controlnet", lesion_classes=2).eval()
    assert model.backend.controlnet.config.conditioning_channels == 1 + 1 + 2
    randomise(model.backend.controlnet)
    batch = make_batch(model.config)
    noisy, t = noisy_like(model, batch)
    with torch.no_grad():
        base = model.predict(noisy, t, batch)
        other = model.predict(noisy, t, {**batch, "image": -batch["image"]})
    assert base.shape == (2, LATENT, 8, 8) and not torch.allclose(base, other)


def test_gradient_checkpointing_gives_the_same_loss(sd_folder):
    model = make_model(sd_folder, "controlnet")
    batch = make_batch(model.config)
    loss = model.training_loss(batch, torch.Generator().manual_seed(0))
    model.enable_gradient_checkpointing()
    loss2 = model.training_loss(batch, torch.Generator().manual_seed(0))
    loss2.backward()
    torch.testing.assert_close(loss2, loss)


# -------------------------------------------------------------------------- model folders
@pytest.mark.parametrize("backend", ["latent_inpaint", "controlnet"])
def test_save_load_round_trip_gives_identical_outputs(sd_folder, tmp_path, backend):
    model = make_model(
        sd_folder, backend, num_class_embeds=2, num_attributes=1, prediction_type="v_prediction"
    )
    batch = make_batch(model.config)
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):  # move the zero-initialised weights away from zero
        model.training_loss(batch, torch.Generator().manual_seed(0)).backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()
    folder = model.save_pretrained(tmp_path / "model", training_record={"splits_sha256": "x"})
    expected = {
        "model_config.yaml",
        "scheduler",
        "training_record.json",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
    } | ({"controlnet"} if backend == "controlnet" else set())
    assert {p.name for p in folder.iterdir()} == expected
    assert not [p for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".ckpt"}]
    loaded = LesionDiffusionModel.from_pretrained(folder).eval()
    assert loaded.config == model.config
    noisy, t = noisy_like(model, batch)
    with torch.no_grad():
        assert torch.equal(loaded.predict(noisy, t, batch), model.predict(noisy, t, batch))


def test_controlnet_can_sit_on_a_fine_tuned_synthlesion_unet(sd_folder, tmp_path):
    """Stage 1 fine-tunes the inpainting UNet; stage 2 trains a ControlNet on it, frozen."""
    stage1 = make_model(sd_folder, lesion_classes=2).save_pretrained(tmp_path / "inpaint")
    model = make_model(stage1, "controlnet", lesion_classes=2)
    assert model.backend.unet_layout == "full"
    assert torch.isfinite(model.training_loss(make_batch(model.config)))


def test_loading_refuses_broken_latent_folders(sd_folder, tmp_path):
    folder = make_model(sd_folder).save_pretrained(tmp_path / "m")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="missing file vae/diffusion_pytorch_model"):
        LesionDiffusionModel.from_pretrained(folder)
    with pytest.raises(ModelFolderError, match="diffusers checkpoint"):
        LesionDiffusionModel.from_pretrained(sd_folder)

    pickled = tmp_path / "pickled"
    shutil.copytree(sd_folder, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelFolderError, match=r"unet/diffusion_pytorch_model\.safetensors.*\.bin"):
        make_model(pickled)
    weights.with_suffix(".bin").rename(weights)
    shutil.rmtree(pickled / "tokenizer")
    with pytest.raises(ModelFolderError, match="tokenizer/"):
        make_model(pickled)


@pytest.mark.parametrize("backend", ["latent_inpaint", "controlnet"])
def test_two_channels_go_through_the_vae_and_come_back_as_two(sd_plain_folder, sd_folder, backend):
    folder = sd_plain_folder if backend == "controlnet" else sd_folder
    model = make_model(folder, backend, image_channels=2).eval()
    if backend == "controlnet":  # the plain base does not see the context: 2 context channels
        assert model.backend.controlnet.config.conditioning_channels == 2 + 1 + 1
        randomise(model.backend.controlnet)  # zero convolutions ignore the control at first
    batch = make_batch(model.config)
    loss = model.training_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    with torch.no_grad():
        decoded = model.decode(model.encode(batch["image"]))
    assert decoded.shape == (2, 2, 16, 16)
    noisy, t = noisy_like(model, batch)
    with torch.no_grad():
        base = model.predict(noisy, t, batch)
        swapped = model.predict(noisy, t, {**batch, "image": batch["image"].flip(1)})
    assert not torch.allclose(base, swapped)  # the channels are seen, in order
