"""The training loop on the CPU: exact resume, signals, NaN steps, export, bad inputs before
any step, and the two command lines."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import phantom_with_splits, single_torch_thread  # noqa: E402
from safetensors.torch import load_file

from synthlesion.cli import main as cli_main
from synthlesion.data.phantom import make_phantom_dataset
from synthlesion.data.sources import load_cases
from synthlesion.data.splits import Splits, load_splits, save_splits, split_patients
from synthlesion.errors import SplitError
from synthlesion.models import LesionDiffusionModel, ModelFolderError
from synthlesion.provenance.identity import GeneratorRef, hash_patient_id
from synthlesion.provenance.record import verify_generator
from synthlesion.storage import sha256_file
from synthlesion.training import checkpoint as ckpt
from synthlesion.training.config import load_train_config
from synthlesion.training.errors import CheckpointError, TrainingAbortedError
from synthlesion.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


one_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return phantom_with_splits(
        tmp_path_factory.mktemp("loop"), n_patients=10, seed=2, lesion_fraction=0.8
    )


def tiny_raw(out: Path, phantom: tuple[Path, Path]) -> dict:
    dataset, splits = phantom
    return {
        "output_dir": str(out),
        "seed": 0,
        "max_steps": 6,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "log_every_n_steps": 1,
        "report_to": "none",
        "data": {
            "dataset": str(dataset),
            "splits": str(splits),
            "roi_size": [16, 16],
            "samples_per_epoch": 16,
            "healthy_fraction": 0.3,
            "region_dilation": 1,
        },
        "model": {
            "spatial_dims": 2,
            "channels": [8, 16],
            "attention_levels": [False, False],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 16,
            "num_train_timesteps": 100,
            "prediction_type": "v_prediction",
        },
        "optim": {"learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 2},
        "ema": {"decay": 0.9},
        "loss": {"lesion_weight": 5.0},
        "validation": {
            "every_n_steps": 2,
            "num_crops": 4,
            "num_preview": 2,
            "num_inference_steps": 2,
        },
        "checkpoint": {"every_n_steps": 0, "total_limit": 2},
    }


def tiny(out: Path, phantom, overrides=()):
    return load_train_config(tiny_raw(out, phantom), list(overrides))


def weights(folder: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{name}.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_reproduces_the_straight_run_exactly(tmp_path, phantom):
    straight = train(tiny(tmp_path / "a", phantom))
    assert straight.status == "completed" and straight.global_step == 6
    first = train(tiny(tmp_path / "b", phantom), stop_at_step=3)
    assert first.status == "stopped" and first.checkpoint.name == "checkpoint-3"
    # The second half reads its crops with two seeded worker processes: same data.
    second = train(tiny(tmp_path / "b", phantom, ["data.num_workers=2"]), resume="latest")
    assert second.status == "completed" and second.global_step == 6
    a, b = straight.checkpoint, second.checkpoint
    for name in ("model", "optimizer", "ema", "lr_scheduler"):
        assert_same(weights(a, name), weights(b, name))
    assert json.loads((a / "lr_scheduler.json").read_text()) == json.loads(
        (b / "lr_scheduler.json").read_text()
    )
    assert_same(weights(straight.model_dir, "weights"), weights(second.model_dir, "weights"))
    trainer = json.loads((b / ckpt.TRAINER_STATE).read_text())
    assert (trainer["epoch"], trainer["batch"]) == (3, 0)  # 12 micro-batches, 4 per epoch
    rows_a = [r for r in straight.metrics if "loss" in r]
    rows_b = [
        json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b if "loss" in r]

    # The export: loadable, EMA weights, the record proving what it was trained on.
    model = LesionDiffusionModel.from_pretrained(straight.model_dir)
    assert model.config.channels == (8, 16)
    record = json.loads((straight.model_dir / "training_record.json").read_text())
    dataset, splits_path = phantom
    splits = load_splits(splits_path)
    assert record["dataset_sha256"] == sha256_file(dataset)
    assert record["splits_file_sha256"] == sha256_file(splits_path)
    assert record["splits_sha256"] == splits.sha256
    train_ids = {
        c.patient_id
        for c in load_cases(dataset)
        if splits.side_of_patient(c.patient_id) == "train" and c.mask is not None
    }
    # The dataset builder's own reader accepts the record and gets the train patients back.
    ref = GeneratorRef.from_folder(straight.model_dir)
    verified = verify_generator(ref, tmp_path)
    hashes = verified.patient_id_hashes
    assert hashes == {hash_patient_id(p) for p in train_ids}
    assert verified.trained_on_any(train_ids) == sorted(train_ids)
    for side in ("val", "test"):
        assert verified.trained_on_any(splits.patients(side)) == []
    assert record["steps"] == 6 and record["seed"] == 0 and record["weights"] == "ema"
    assert record["versions"]["torch"] and record["data"]["intensity"]["mode"] == "percentile"
    assert record["data"]["roi_size"] == [16, 16] and record["data"]["lesion_label_values"] == [2]
    assert (straight.model_dir / "train_config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "a" / "previews").iterdir())[:2] == [
        "fidelity-0000002.png",
        "fidelity-0000004.png",
    ]
    assert "val/loss" in straight.metrics[0] and straight.metrics[0]["step"] == 0


def test_signal_saves_at_the_step_boundary_and_a_second_aborts_cleanly(
    tmp_path, phantom, monkeypatch
):
    config = tiny(
        tmp_path / "run", phantom, ["checkpoint.every_n_steps=1", "validation.every_n_steps=0"]
    )

    def first_signal(step: int, row: dict) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(config, progress=first_signal)
    assert result.status == "interrupted" and result.global_step == 2
    assert (result.checkpoint / ckpt.COMPLETE).is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    # Second run: the first signal at step 4, a second one while its checkpoint is written.
    write_state = ckpt.write_state

    def interrupted_write(folder, name, state):
        if name == "optimizer" and ".checkpoint-4" in str(folder):
            os.kill(os.getpid(), signal.SIGTERM)
        return write_state(folder, name, state)

    monkeypatch.setattr(ckpt, "write_state", interrupted_write)

    def signal_at_4(step: int, row: dict) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    # checkpoint-3 is the periodic save; at step 4 the periodic save is hit by the signal
    with pytest.raises(KeyboardInterrupt):
        train(config, resume="latest", progress=signal_at_4)
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-2", "checkpoint-3"]  # nothing half-written left behind
    monkeypatch.setattr(ckpt, "write_state", write_state)
    done = train(config, resume="latest")
    assert done.status == "completed" and done.global_step == 6


def test_nonfinite_loss_skips_the_step_and_aborts_after_k_in_a_row(tmp_path, phantom):
    def run(out: Path, bad: set[int], limit: int):
        config = tiny(
            out,
            phantom,
            [
                "gradient_accumulation_steps=1",
                f"max_nonfinite_steps={limit}",
                "validation.every_n_steps=0",
            ],
        )
        torch.manual_seed(config.seed)
        model = LesionDiffusionModel.from_config(config.model)
        original = model.forward
        calls = {"n": 0}

        def forward(*args, **kwargs):
            calls["n"] += 1
            loss = original(*args, **kwargs)
            return (
                loss * float("nan") if calls["n"] in bad or (calls["n"] > 2 and -1 in bad) else loss
            )

        model.forward = forward
        return model, train(config, model=model)

    model, result = run(tmp_path / "once", {3}, 3)
    assert result.status == "completed" and result.global_step == 6
    assert result.metrics[-2]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())

    with pytest.raises(TrainingAbortedError, match="3 non-finite losses in a row") as info:
        run(tmp_path / "always", {-1}, 3)
    assert "checkpoint-2" in str(info.value)
    saved = weights(tmp_path / "always" / "checkpoint-2")
    again = train(
        tiny(
            tmp_path / "ref",
            phantom,
            ["gradient_accumulation_steps=1", "validation.every_n_steps=0"],
        ),
        stop_at_step=2,
    )
    assert_same(saved, weights(again.checkpoint))  # the last good state, untouched by NaNs


def _nothing_ran(out: Path) -> bool:
    return not out.exists() or not [
        p for p in out.iterdir() if p.name.startswith("checkpoint") or p.name.endswith(".jsonl")
    ]


def test_bad_inputs_fail_before_any_step(tmp_path, phantom):
    good = train(tiny(tmp_path / "good", phantom, ["max_steps=1"]))
    model_dir = good.model_dir

    broken = tmp_path / "broken_model"
    LesionDiffusionModel.from_pretrained(model_dir).save_pretrained(broken)
    (broken / "weights.safetensors").unlink()
    out = tmp_path / "r1"
    with pytest.raises(ModelFolderError, match="weights.safetensors"):
        train(tiny(out, phantom, [f"init_from={broken}"]))
    assert _nothing_ran(out)

    pickled = tmp_path / "r2" / "checkpoint-5"
    pickled.mkdir(parents=True)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (pickled / "random_states_0.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        train(tiny(tmp_path / "r2", phantom), resume=str(pickled))

    with pytest.raises(CheckpointError, match="checkpoints of an earlier run"):
        train(tiny(tmp_path / "good", phantom, ["max_steps=2"]))  # a fresh run there

    last = good.checkpoint
    for suffix in ("safetensors", "json"):
        (last / f"rng_state_0.{suffix}").unlink()
    with pytest.raises(CheckpointError, match="rng_state_0"):
        train(tiny(tmp_path / "good", phantom, ["max_steps=2"]), resume="latest")

    dataset, splits_path = phantom
    other = tmp_path / "other_splits.json"
    cases = load_cases(dataset)
    save_splits(
        Splits(
            {"train": tuple(c.patient_id for c in cases[1:])},
            {c.case_id: c.patient_id for c in cases[1:]},
        ),
        other,
    )
    out = tmp_path / "r3"
    with pytest.raises(SplitError, match=f"case {cases[0].case_id} is not in the splits file"):
        train(tiny(out, phantom, [f"data.splits={other}"]))
    assert _nothing_ran(out)


def test_command_lines_train_stop_and_resume(tmp_path, phantom):
    raw = tiny_raw(tmp_path / "cli", phantom)
    raw["max_steps"] = 2
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert (
        cli_main(
            [
                "train",
                "--config",
                str(path),
                "--stop-at-step",
                "1",
                "--no-progress",
                "--set",
                "validation.every_n_steps=0",
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "checkpoint-1" / ckpt.COMPLETE).is_file()
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_script", ROOT / "training" / "train_lesion_diffusion.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (
        script.main(
            [
                "--config",
                str(path),
                "--resume",
                "latest",
                "--no-progress",
                "--set",
                "validation.every_n_steps=0",
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "model" / "weights.safetensors").is_file()
    assert script.main(["--config", str(path), "--set", "data.bogus=1"]) == 1


def test_tiny_3d_run_trains_and_exports(tmp_path):
    dataset = make_phantom_dataset(
        tmp_path / "ct3d",
        kind="ct",
        spatial_dims=3,
        n_patients=4,
        size=32,
        seed=0,
        lesion_fraction=1.0,
    )
    splits = tmp_path / "splits.json"
    save_splits(split_patients(load_cases(dataset), fractions=(0.5, 0.25, 0.25), seed=0), splits)
    raw = tiny_raw(tmp_path / "run", (dataset, splits))
    raw["data"].update({"roi_size": [16, 16, 16], "spacing": [11.25, 11.25, 11.25]})
    raw["model"].update({"spatial_dims": 3, "pixel_network": "monai"})
    raw.update({"max_steps": 2, "gradient_accumulation_steps": 1, "batch_size": 2})
    result = train(load_train_config(raw))
    assert result.status == "completed"
    model = LesionDiffusionModel.from_pretrained(result.model_dir)
    assert model.config.spatial_dims == 3
    record = json.loads((result.model_dir / "training_record.json").read_text())
    assert record["data"]["spacing"] == [11.25, 11.25, 11.25]
    assert record["data"]["modality"] == "CT"


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_mixed_precision_trains_and_resumes(tmp_path, phantom, fresh_accelerate_state):
    config = tiny(
        tmp_path / "bf16",
        phantom,
        ["mixed_precision=bf16", "max_steps=3", "validation.every_n_steps=0"],
    )
    assert train(config, stop_at_step=2).status == "stopped"
    result = train(config, resume="latest")
    assert result.status == "completed" and result.global_step == 3
    assert all(torch.isfinite(t).all() for t in weights(result.model_dir, "weights").values())


@pytest.mark.slow
def test_two_process_ddp_run_saves_per_rank_random_states_and_resumes(tmp_path, phantom):
    import subprocess
    import sys

    raw = tiny_raw(tmp_path / "ddp", phantom)
    raw.update(
        {
            "max_steps": 4,
            "validation": {
                "every_n_steps": 0,
                "num_crops": 4,
                "num_preview": 2,
                "num_inference_steps": 2,
            },
        }
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(ROOT / "training" / "train_lesion_diffusion.py"),
        "--config",
        str(path),
        "--no-progress",
    ]
    for extra in (["--stop-at-step", "2"], ["--resume", "latest"]):
        done = subprocess.run(
            command + extra, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
    first = tmp_path / "ddp" / "checkpoint-2"
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors"} <= {
        p.name for p in first.iterdir()
    }
    assert json.loads((first / ckpt.COMPLETE).read_text())["world_size"] == 2
    record = json.loads((tmp_path / "ddp" / "model" / "training_record.json").read_text())
    assert record["world_size"] == 2 and record["effective_batch_size"] == 16
    assert record["steps"] == 4 and len(record["resumed_from"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train_phantom2d_cpu.yaml", "train_phantom3d_cpu.yaml"])
def test_shipped_cpu_configs_make_their_phantom_and_train(tmp_path, name):
    config = load_train_config(
        ROOT / "configs" / name,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.dataset={tmp_path / 'data' / 'dataset.json'}",
            f"data.splits={tmp_path / 'data' / 'splits.json'}",
            "max_steps=2",
            "validation.num_crops=2",
            "validation.num_preview=1",
            "validation.num_inference_steps=2",
        ],
    )
    result = train(config)
    assert result.status == "completed"
    assert (tmp_path / "data" / "splits.json").is_file()
    assert (result.model_dir / "training_record.json").is_file()
    assert list((tmp_path / "run" / "previews").glob("step-*.png"))


@pytest.mark.parametrize("backend", ["latent_inpaint", "controlnet"])
def test_latent_backends_train_resume_exactly_and_skip_frozen_weights(tmp_path, phantom, backend):
    from test_models_latent import write_tiny_sd_folder

    sd = write_tiny_sd_folder(tmp_path / "sd")

    def config(out: Path):
        raw = tiny_raw(out, phantom)
        raw["model"] = {
            "backend": backend,
            "spatial_dims": 2,
            "pretrained_path": str(sd),
            "default_prompt": "an mri",
        }
        raw["data"]["prompt"] = "a brain mri with a {label}"
        raw.update({"max_steps": 3, "gradient_accumulation_steps": 1})
        raw["validation"]["every_n_steps"] = 0
        return load_train_config(raw)

    straight = train(config(tmp_path / "a"))
    assert train(config(tmp_path / "b"), stop_at_step=1).status == "stopped"
    resumed = train(config(tmp_path / "b"), resume="latest")
    for name in ("model", "optimizer", "ema"):
        assert_same(weights(straight.checkpoint, name), weights(resumed.checkpoint, name))
    saved = weights(straight.checkpoint)
    model = LesionDiffusionModel.from_pretrained(straight.model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & saved.keys()  # VAE / text encoder not repeated
    assert trainable <= saved.keys()
