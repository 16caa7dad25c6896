"""Classical augmentation of the training crops (``TrainConfig.augment``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import phantom_with_splits, single_torch_thread  # noqa: E402
from test_training_loop import assert_same, tiny, weights

from synthlesion.errors import ConfigError
from synthlesion.training.augment import CropAugmenter
from synthlesion.training.config import AugmentConfig
from synthlesion.training.loop import train

one_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)

FULL = AugmentConfig(
    enabled=True, p=1.0, rotate_deg=15, scale=(0.85, 1.15), elastic_mm=2.0, flip_axes=(1,),
    noise_std=0.05, gamma_log=0.2, bias=0.2,
)  # fmt: skip


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return phantom_with_splits(
        tmp_path_factory.mktemp("augment"), n_patients=10, seed=2, lesion_fraction=0.8
    )


def crops(batch: int = 4, size: int = 24) -> dict:
    """Crops like the loop's: an image, a disc lesion and the region = a larger disc."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, size)] * 2, indexing="ij")
    r2 = (axes[0] - 0.1) ** 2 + (axes[1] + 0.2) ** 2
    lesion = (r2 < 0.1).float()[None, None].repeat(batch, 1, 1, 1)
    region = (r2 < 0.2).float()[None, None].repeat(batch, 1, 1, 1)
    image = (torch.cos(3 * axes[0]) * 0.3 + 0.5 * lesion[0, 0])[None, None].repeat(batch, 1, 1, 1)
    return {"image": image, "region": region, "lesion": lesion, "case_id": ["c"] * batch}


def test_masks_stay_binary_and_move_with_the_image() -> None:
    aug = CropAugmenter(FULL, 2, (1.5, 1.5), seed=0)
    batch = crops()
    out = aug(batch, epoch=0, index=3)
    assert out["case_id"] == batch["case_id"]
    for key in ("region", "lesion"):
        assert out[key].dtype == torch.float32
        assert set(out[key].unique().tolist()) <= {0.0, 1.0}
        assert not torch.equal(out[key], batch[key])  # moved
    assert bool((out["lesion"] <= out["region"]).all())  # the lesion stays inside its region
    assert not torch.equal(out["image"], batch["image"])
    assert not torch.equal(out["image"][0], out["image"][1])  # each crop its own draw


def test_the_draw_depends_only_on_seed_rank_and_data_position() -> None:
    batch = crops()
    a = CropAugmenter(FULL, 2, None, seed=0)(batch, 1, 2)
    b = CropAugmenter(FULL, 2, None, seed=0)(batch, 1, 2)
    c = CropAugmenter(FULL, 2, None, seed=0)(batch, 1, 3)
    d = CropAugmenter(FULL, 2, None, seed=0, rank=1)(batch, 1, 2)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["lesion"], b["lesion"])
    assert not torch.equal(a["image"], c["image"]) and not torch.equal(a["image"], d["image"])


def test_intensity_only_leaves_the_masks_untouched() -> None:
    cfg = AugmentConfig(enabled=True, p=1.0, rotate_deg=0, scale=(1.0, 1.0), noise_std=0.1)
    batch = crops()
    out = CropAugmenter(cfg, 2, None, seed=0)(batch, 0, 0)
    assert torch.equal(out["region"], batch["region"]) and torch.equal(
        out["lesion"], batch["lesion"]
    )
    assert not torch.equal(out["image"], batch["image"])


def test_bad_settings_fail_before_any_step(tmp_path, phantom) -> None:
    with pytest.raises(ConfigError, match="augment.p"):
        tiny(tmp_path / "a", phantom, ["augment.enabled=true", "augment.p=1.5"])
    with pytest.raises(ConfigError, match="augment.flip_axes"):
        tiny(tmp_path / "b", phantom, ["augment.flip_axes=[2]"])
    with pytest.raises(ConfigError, match="unknown"):
        tiny(tmp_path / "c", phantom, ["augment.rotation=5"])
    folding = tiny(tmp_path / "d", phantom, ["augment.enabled=true", "augment.elastic_mm=40"])
    with pytest.raises(ConfigError, match="augment: .*max_displacement"):
        train(folding)
    assert not (tmp_path / "d" / "metrics.jsonl").exists()


def test_augmented_run_resumes_exactly(tmp_path, phantom) -> None:
    on = ["augment.enabled=true", "augment.p=0.8", "augment.elastic_mm=1.0",
          "augment.noise_std=0.05", "augment.gamma_log=0.1", "augment.flip_axes=[0]"]  # fmt: skip
    straight = train(tiny(tmp_path / "a", phantom, on))
    plain = train(tiny(tmp_path / "p", phantom))
    first = train(tiny(tmp_path / "b", phantom, on), stop_at_step=3)
    assert first.status == "stopped"
    second = train(tiny(tmp_path / "b", phantom, on), resume="latest")
    for name in ("model", "optimizer", "ema"):
        assert_same(weights(straight.checkpoint, name), weights(second.checkpoint, name))
    augmented = weights(straight.checkpoint, "model")
    baseline = weights(plain.checkpoint, "model")
    assert any(not torch.equal(augmented[k], baseline[k]) for k in augmented)


def test_shipped_configs_augment_settings_are_accepted() -> None:
    from synthlesion.training.config import load_train_config

    root = Path(__file__).resolve().parents[1] / "configs"
    enabled = 0
    for path in sorted(root.glob("train_*.yaml")):
        config = load_train_config(path)
        if config.augment.enabled:
            enabled += 1
            dims = len(config.data.roi_size)
            aug = CropAugmenter(config.augment, dims, config.data.spacing, config.seed)
            aug.check(config.data.roi_size)
    assert enabled >= 2
