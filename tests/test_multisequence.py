"""Real scans as hospitals have them: several channels painted jointly, lesion-only label maps,
sub-region classes, placement regions, and the whole chain on the multi-sequence brain phantom
(check -> split -> train -> sample -> build-dataset), as the README walks it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from synthlesion.cli import main
from synthlesion.data.intensity import background_value, foreground_mask
from synthlesion.data.io import load_image, save_image
from synthlesion.data.volume import Volume
from synthlesion.errors import ConfigError
from synthlesion.masks import PlacementError, placement_region
from synthlesion.masks.lesions import class_depth_order, connected_lesions, nest_classes
from synthlesion.models import LesionDiffusionModel, ModelConfig
from synthlesion.models.errors import BatchError
from synthlesion.pipelines.lesion_synthesis import LesionSynthesisPipeline, SynthesisError
from synthlesion.pipelines.sampling import SampleOptions, run_sampling

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train_brain_multiseq_cpu.yaml"
CHANNELS = 4


# --- the model: C channels in and out --------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_pixel_model_sees_and_predicts_every_channel(dims):
    config = ModelConfig(
        spatial_dims=dims,
        image_channels=3,
        lesion_classes=2,
        sample_size=8,
        channels=(8, 8),
        attention_levels=(False, False),
        layers_per_block=1,
        norm_num_groups=4,
        num_train_timesteps=10,
    )
    model = LesionDiffusionModel.from_config(config)
    shape = (8,) * dims
    batch = {
        "image": torch.rand(2, 3, *shape) * 2 - 1,
        "region": torch.zeros(2, 1, *shape),
        "lesion": torch.zeros(2, 2, *shape),
    }
    loss = model.training_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    with pytest.raises(BatchError, match=r"\(B, 3, \*S\)"):
        model.training_loss({**batch, "image": batch["image"][:, :1]})


def test_latent_backends_refuse_more_than_three_channels():
    with pytest.raises(ConfigError, match="at most 3 image channels"):
        ModelConfig(backend="latent_inpaint", pretrained_path="x", image_channels=4)
    from synthlesion.models.latent import from_vae_rgb, to_vae_rgb

    two = torch.rand(1, 2, 4, 4)
    rgb = to_vae_rgb(two)
    assert rgb.shape == (1, 3, 4, 4) and torch.equal(from_vae_rgb(rgb, 2), two)
    assert torch.allclose(from_vae_rgb(to_vae_rgb(two[:, :1]), 1), two[:, :1])


# --- where lesions may go ----------------------------------------------------------------------


def _head(shape=(40, 40, 30)) -> tuple[np.ndarray, np.ndarray]:
    """A z-scored 'head' with a constant background of exactly 0 and negative values inside."""
    grid = np.meshgrid(*[np.arange(s) - s / 2 for s in shape], indexing="ij")
    inside = sum((g / (s / 2.5)) ** 2 for g, s in zip(grid, shape, strict=True)) <= 1
    rng = np.random.default_rng(0)
    image = np.where(inside, rng.normal(0, 1, shape), 0.0).astype(np.float32)
    return image, inside


def test_foreground_of_a_z_scored_scan_is_the_head_not_the_positive_voxels():
    image, inside = _head()
    assert background_value(image) == 0.0
    found = foreground_mask(image)
    assert np.array_equal(found, inside)  # negative z-scores are inside; the air is not
    ct = np.full((20, 20), -1000.0) + np.random.default_rng(1).normal(0, 5, (20, 20))
    ct[5:15, 5:15] = 40
    assert background_value(ct) is None
    assert foreground_mask(ct, "CT").sum() == 100


def test_placement_region_order_user_then_label_then_organ_then_foreground():
    image, inside = _head()
    labels = np.zeros(image.shape, np.uint8)
    labels[18:22, 18:22, 13:17] = 2  # a lesion, no organ label
    user = np.zeros(image.shape, np.uint8)
    user[10:20, 10:20, 10:20] = 1
    got = placement_region(labels, image, user_region=user, organ_labels=(1,), lesion_labels=(2,))
    assert got.source == "user" and got.mask.sum() == 1000
    got = placement_region(labels, image, region_label=2, lesion_labels=(2,))
    assert got.source == "label" and got.mask.sum() == 64
    organ = labels.copy()
    organ[5:10, 5:10, 5:10] = 1
    got = placement_region(organ, image, organ_labels=(1,), lesion_labels=(2,))
    assert got.source == "organ" and got.mask.sum() == 125 + 64
    got = placement_region(labels, image, organ_labels=(), lesion_labels=(2,))
    assert got.source == "foreground" and np.array_equal(got.mask, inside | (labels == 2))
    with pytest.raises(PlacementError, match="does not fit"):
        placement_region(labels, image, user_region=user[:-1])
    with pytest.raises(PlacementError, match="empty"):
        placement_region(labels, image, user_region=np.zeros_like(user))


def test_a_lesion_is_a_connected_tumour_with_its_subregions_and_specks_are_not():
    labels = np.zeros((30, 30), np.float32)  # float label maps with whole values
    labels[5:20, 5:20] = 2  # edema
    labels[8:17, 8:17] = 3  # enhancing rim
    labels[10:15, 10:15] = 1  # necrotic core
    labels[25:27, 25:27] = 2  # a speck of 4 pixels
    found = list(connected_lesions(labels.astype(np.int64), (1, 2, 3)))
    assert len(found) == 1 and found[0].voxels == 225
    fractions = found[0].class_fractions(3)
    assert fractions == pytest.approx([25 / 225, (225 - 81) / 225, (81 - 25) / 225])
    order = class_depth_order(found, 3)
    assert order == (2, 3, 1)  # edema outside, rim, core inside
    nested = nest_classes(np.ones((21, 21), bool), fractions, order)
    assert nested[0, 0] == 2 and nested[10, 10] == 1
    assert np.bincount(nested.ravel(), minlength=4)[1:] == pytest.approx(fractions * 441, abs=2)


# --- the pipeline: every channel, the region, outside bit-identical ----------------------------


def _tiny_multichannel_model(classes: int = 1) -> LesionDiffusionModel:
    torch.manual_seed(0)
    return LesionDiffusionModel.from_config(
        ModelConfig(
            spatial_dims=3,
            image_channels=CHANNELS,
            lesion_classes=classes,
            pixel_network="monai",
            sample_size=16,
            channels=(8, 8),
            attention_levels=(False, False),
            layers_per_block=1,
            norm_num_groups=4,
            num_train_timesteps=20,
        )
    )


def test_pipeline_paints_all_channels_inside_the_region_only():
    from synthlesion.data.intensity import IntensityNormaliser

    image, inside = _head()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS
    channels = [Volume(image * (c + 1), affine) for c in range(CHANNELS)]
    target = np.zeros(image.shape, np.int64)
    target[17:22, 17:22, 12:16] = 1
    region = np.zeros(image.shape, bool)
    region[15:24, 15:24, 11:18] = True  # tight: the 3 mm blend margin is clipped to it
    pipe = LesionSynthesisPipeline(
        _tiny_multichannel_model(), IntensityNormaliser("percentile"), (16, 16, 16)
    )
    out = pipe(channels, target, region_mask=region, num_inference_steps=2, dilation_mm=3.0)
    assert len(out.images) == CHANNELS
    for source, painted in zip(channels, out.images, strict=True):
        assert painted.dtype == source.array.dtype and painted.shape == source.shape
        changed = painted != source.array
        assert changed[target > 0].all()  # every channel changes on the lesion
        assert not changed[~region].any()  # nothing outside the placement region
    with pytest.raises(SynthesisError, match="outside the placement region"):
        pipe(channels, target, region_mask=np.zeros_like(region), num_inference_steps=1)
    with pytest.raises(SynthesisError, match="2 image channel"):
        pipe(channels[:2], target, num_inference_steps=1)


# --- the chain on the multi-sequence brain phantom ---------------------------------------------


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> dict[str, Path]:
    """Phantom (lesion-only labels 1-4 as float, LPS, 4 sequences) -> check -> split -> train."""
    root = tmp_path_factory.mktemp("brain")
    data = root / "data"
    assert main(["phantom", "--out", str(data), "--kind", "brain-mri-multi",
                 "--size", "40", "--patients", "8", "--seed", "1"]) == 0  # fmt: skip
    # healthy scans have all-background label maps: a warning, not an error, for this dataset
    assert main(["check", str(data), "--empty-mask", "warn"]) == 0
    splits = data / "splits.json"
    assert main(["split", str(data), "--out", str(splits)]) == 0
    model_dir = root / "run"
    assert main(["train", "--config", str(CONFIG),
                 "--set", f"output_dir={model_dir}", "--set", f"data.dataset={data}",
                 "--set", f"data.splits={splits}", "--set", "data.roi_size=[16,16,16]",
                 "--set", "model.sample_size=16", "--set", "max_steps=3",
                 "--set", "validation.every_n_steps=3", "--set", "validation.num_crops=2",
                 "--set", "validation.num_preview=1", "--set", "validation.num_inference_steps=2",
                 "--set", "checkpoint.every_n_steps=3"]) == 0  # fmt: skip
    return {"root": root, "data": data, "splits": splits, "model": model_dir / "model"}


def _rows(manifest: Path) -> list[dict]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    return [r for r in rows if "case_id" in r]


def _assert_inside_region(brain: dict[str, Path], out: Path, region_of) -> int:
    """Every sampled case: all channels written, changed voxels and new lesion voxels inside
    the placement region, every channel changed on every new lesion voxel."""
    data = brain["data"]
    rows = _rows(out / "manifest.jsonl")
    for row in rows:
        source = row["source_case"]
        assert len(row["images"]) == CHANNELS
        labels = np.asarray(nib.load(out / row["mask"]).dataobj)
        before = np.asarray(nib.load(data / "labelsTr" / f"{source}.nii.gz").dataobj)
        assert nib.load(out / row["mask"]).get_data_dtype() == np.float32  # kept as the source
        new = labels != before
        assert new.any()
        assert set(np.unique(labels[new])) <= {1.0, 2.0, 3.0, 4.0}
        first = data / "imagesTr" / f"{source}_0000.nii.gz"
        region = region_of(source, np.asarray(nib.load(first).dataobj))
        assert not (new & ~region).any(), f"{row['case_id']}: lesion voxel outside the region"
        for c, rel in enumerate(row["images"]):
            src = nib.load(data / "imagesTr" / f"{source}_{c:04d}.nii.gz")
            syn = nib.load(out / rel)
            assert nib.aff2axcodes(syn.affine) == ("L", "P", "S")
            assert int(syn.header["qform_code"]) == int(src.header["qform_code"])
            changed = np.asarray(syn.dataobj) != np.asarray(src.dataobj)
            assert changed[new].all(), f"{rel}: channel {c} unchanged on the lesion"
            assert not (changed & ~region).any(), f"{rel}: changed outside the region"
    return len(rows)


def test_bank_lesions_stay_inside_the_head_without_any_organ_label(brain):
    out = brain["root"] / "syn_bank"
    assert main(["sample", "--model", str(brain["model"]), "--data", str(brain["data"]),
                 "--splits", str(brain["splits"]), "--out", str(out),
                 "--steps", "2", "--limit", "3"]) == 0  # fmt: skip
    n = _assert_inside_region(brain, out, lambda source, image: foreground_mask(image))
    assert n >= 2
    report = json.loads((out / "sample_report.json").read_text())
    assert len(report["written"]) + len(report["failed"]) == 3
    built = brain["root"] / "built"
    # a 3-step model's lesions fail the quality gate: built only when asked for
    assert main(["build-dataset", str(brain["data"]), "--splits", str(brain["splits"]),
                 "--manifest", str(out / "manifest.jsonl"), "--out", str(built),
                 "--include-rejected", "1"]) == 0  # fmt: skip
    spec = json.loads((built / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "FLAIR", "1": "T1", "2": "T1c", "3": "T2"}
    synthetic = [e for e in spec["training"] if e.get("origin") == "synthetic"]
    assert synthetic and all(len(e["image"]) == CHANNELS for e in synthetic)


def test_procedural_lesions_follow_region_masks_and_real_sizes(brain):
    out = brain["root"] / "syn_proc"
    masks = brain["data"] / "brainmasks"
    assert main(["sample", "--model", str(brain["model"]), "--data", str(brain["data"]),
                 "--splits", str(brain["splits"]), "--out", str(out),
                 "--mask-source", "procedural", "--region-masks", str(masks),
                 "--steps", "2", "--limit", "3"]) == 0  # fmt: skip

    def brain_mask(source: str, image: np.ndarray) -> np.ndarray:
        return np.asarray(nib.load(masks / f"{source}.nii.gz").dataobj) > 0

    assert _assert_inside_region(brain, out, brain_mask) >= 2
    record = json.loads((brain["model"] / "training_record.json").read_text())
    assert record["data"]["channel_names"] == ["FLAIR", "T1", "T1c", "T2"]
    # procedural tumours are drawn from the real tumours' sizes and nest their sub-regions
    real = []
    for path in sorted((brain["data"] / "labelsTr").glob("*.nii.gz")):
        real += [x.voxels for x in connected_lesions(np.rint(load_image(path).array).astype(int),
                                                     (1, 2, 3, 4))]  # fmt: skip
    for row in _rows(out / "manifest.jsonl"):
        for lesion in row["quality"]["mask_facts"]["lesions"]:
            assert lesion["voxels"] >= min(real) / 4
        assert row["quality"]["mask_facts"]["placement_region"]["source"] == "user"


def test_bad_inputs_are_clear_errors_or_reported_per_case(brain, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(brain["data"], data)
    common = ["--model", str(brain["model"]), "--splits", str(data / "splits.json"), "--steps", "1"]
    # a region mask that does not fit one scan, an empty one for another: reported per case
    masks = tmp_path / "regions"
    shutil.copytree(data / "brainmasks", masks)
    train = set(json.loads((data / "splits.json").read_text())["sides"]["train"])
    files = sorted(p for p in masks.glob("*.nii.gz") if p.name[:14] in train)  # BraTS-PH-00012
    odd = load_image(files[0])
    save_image(Volume(odd.array[:-2], odd.affine), files[0])
    save_image(odd.with_array(np.zeros_like(odd.array)), files[1])
    report = run_sampling(
        brain["model"], data, data / "splits.json", tmp_path / "o1",
        SampleOptions(steps=1, region_masks=masks, mask_source="procedural"),
    )  # fmt: skip
    problems = " | ".join(f["problem"] for f in report.failed)
    assert "does not match" in problems or "shape" in problems
    assert "empty" in problems
    # a placement impossible (a one-voxel region): reported per case, not a crash
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for path in sorted((data / "brainmasks").glob("*.nii.gz")):
        volume = load_image(path)
        one = np.zeros_like(volume.array)
        one[tuple(s // 2 for s in one.shape)] = 1
        save_image(volume.with_array(one), tiny / path.name)
    report = run_sampling(
        brain["model"], data, data / "splits.json", tmp_path / "o2",
        SampleOptions(steps=1, region_masks=tiny, limit=2),
    )  # fmt: skip
    assert report.failed and not report.written
    assert all("no lesion placed" in f["problem"] for f in report.failed)
    # channels missing for one case: that case fails, naming the file
    spec = json.loads((data / "dataset.json").read_text())
    victim = next(e for e in spec["training"] if e["patient_id"] in train)
    (data / victim["image"][3]).unlink()
    report = run_sampling(
        brain["model"],
        data,
        data / "splits.json",
        tmp_path / "o3",
        SampleOptions(steps=1, limit=20),
    )
    named = [f for f in report.failed if f["source"] == victim["case_id"]]
    assert len(named) == 1 and "_0003" in named[0]["problem"]
    assert not any(c.startswith(f"syn_{victim['case_id']}_") for c in report.written)
    # channel names different from the model's: refused before anything is written
    spec["channel_names"] = spec["modality"] = {"0": "T1", "1": "FLAIR", "2": "T1c", "3": "T2"}
    (data / "dataset.json").write_text(json.dumps(spec))
    assert main(["sample", *common, "--data", str(data), "--out", str(tmp_path / "o4")]) == 1
    assert not (tmp_path / "o4" / "manifest.jsonl").exists()
    with pytest.raises(SynthesisError, match=r"channels \['T1', 'FLAIR'"):
        run_sampling(brain["model"], data, data / "splits.json", tmp_path / "o5")
    # label values the model was not trained on
    spec["channel_names"] = spec["modality"] = {"0": "FLAIR", "1": "T1", "2": "T1c", "3": "T2"}
    spec["labels"] = {**spec["labels"], "metastasis": 5}
    (data / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(SynthesisError, match=r"values \[5\] were never trained on"):
        run_sampling(brain["model"], data, data / "splits.json", tmp_path / "o6")


# --- 2D models from 3D scans -------------------------------------------------------------------


def test_a_2d_model_learns_from_axial_slices_of_3d_scans(brain, tmp_path):
    from synthlesion.training.config import load_train_config
    from synthlesion.training.crops import CropMaker, crop_spec
    from synthlesion.training.data import load_training_data

    raw = {
        "output_dir": str(tmp_path / "run2d"),
        "max_steps": 2,
        "batch_size": 2,
        "data": {
            "dataset": str(brain["data"]),
            "splits": str(brain["splits"]),
            "roi_size": [16, 16],
            "slice_axis": 2,
            "healthy_fraction": 0.3,
            "region_dilation": 1,
            "samples_per_epoch": 16,
        },
        "model": {
            "spatial_dims": 2,
            "image_channels": 4,
            "lesion_classes": 4,
            "sample_size": 16,
            "channels": [8, 8],
            "attention_levels": [False, False],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "num_train_timesteps": 20,
        },  # fmt: skip
        "validation": {
            "every_n_steps": 2,
            "num_crops": 2,
            "num_preview": 1,
            "num_inference_steps": 2,
        },  # fmt: skip
        "checkpoint": {"every_n_steps": 2},
    }
    config = load_train_config(raw)
    data = load_training_data(config.data, spatial_dims=2, seed=0)
    assert data.train[0].image.ndim == 4  # prepared scans stay 3D: (C, X, Y, Z)
    maker = CropMaker(data.train, crop_spec(config.data, data, None))
    rng = np.random.default_rng(0)
    lesion_crops = 0
    for _ in range(12):
        item = maker.draw(rng)
        assert item["image"].shape == (4, 16, 16) and item["lesion"].shape == (4, 16, 16)
        assert item["region"].sum() > 0
        lesion_crops += int(item["lesion"].sum() > 0)
    assert lesion_crops > 0
    lesion = maker.draw(np.random.default_rng(1), healthy=False)
    assert lesion["lesion"].sum() > 0  # a slice through the tumour
    from synthlesion.training.loop import train

    result = train(config)
    record = json.loads((result.model_dir / "training_record.json").read_text())
    assert record["data"]["slice_axis"] == 2 and record["data"]["image_channels"] == 4
    with pytest.raises(Exception, match="slice_axis"):
        load_training_data(config.data, spatial_dims=3, seed=0)


# --- channels as files, as a 4D file, as manifest columns --------------------------------------


def test_channels_from_a_4d_file_and_from_manifest_columns_read_alike(tmp_path):
    from synthlesion.data.io import load_channels
    from synthlesion.data.sources import load_manifest

    rng = np.random.default_rng(0)
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    stack = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(stack, affine), str(tmp_path / "case_4d.nii.gz"))
    for c, name in enumerate(("flair", "t1", "t2")):
        nib.save(nib.Nifti1Image(stack[..., c], affine), str(tmp_path / f"case_{name}.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.uint8), affine), str(tmp_path / "seg.nii.gz"))
    (tmp_path / "cases.csv").write_text(
        "case_id,image_flair,image_t1,image_t2,mask\n"
        "case,case_flair.nii.gz,case_t1.nii.gz,case_t2.nii.gz,seg.nii.gz\n"
    )
    (case,) = load_manifest(tmp_path / "cases.csv")
    assert case.modalities == ("flair", "t1", "t2") and case.channel_count == 3
    assert "image_t1" not in case.provenance
    from_files = load_channels(case.images)
    from_4d = load_channels([tmp_path / "case_4d.nii.gz"])
    assert len(from_files) == len(from_4d) == 3
    for a, b in zip(from_files, from_4d, strict=True):
        assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)
    (tmp_path / "bad.csv").write_text("case_id,image_flair,image_t1\ncase,case_flair.nii.gz,\n")
    from synthlesion.errors import CaseSourceError

    with pytest.raises(CaseSourceError, match=r"image_t1"):
        load_manifest(tmp_path / "bad.csv")


def test_each_ct_phase_is_windowed_on_its_own_and_restored(tmp_path):
    from synthlesion.data.cases import Case
    from synthlesion.data.intensity import IntensityNormaliser
    from synthlesion.training.preprocess import Preprocessing, prepare_case

    rng = np.random.default_rng(0)
    shape = (24, 24, 12)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    body = np.full(shape, -1000, np.int16)
    body[3:21, 3:21, :] = 40
    arterial = (body + rng.normal(0, 8, shape)).astype(np.int16)
    venous = (body + 60 + rng.normal(0, 8, shape)).astype(np.int16)
    for name, array in (("art", arterial), ("ven", venous)):
        nib.save(nib.Nifti1Image(array, affine), str(tmp_path / f"{name}.nii.gz"))
    mask = np.zeros(shape, np.uint8)
    mask[10:14, 10:14, 5:8] = 1
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "seg.nii.gz"))
    case = Case(
        "c", "p", (tmp_path / "art.nii.gz", tmp_path / "ven.nii.gz"), tmp_path / "seg.nii.gz",
        modality="CT", labels={0: "background", 1: "tumour"}, modalities=("arterial", "venous"),
    )  # fmt: skip
    norm = IntensityNormaliser("window", windows=((-100.0, 200.0), (0.0, 300.0)))
    pre = Preprocessing(3, None, norm, (1,), (), 1, channels=2, modality="CT")
    prepared = prepare_case(case, pre)
    assert prepared.image.shape == (2, *shape)
    inside = prepared.tissue
    # the same tissue (40 HU arterial, 100 HU venous) sits at its own window position
    assert np.median(prepared.image[0][inside]) == pytest.approx((40 + 100) / 300 * 2 - 1, abs=0.1)
    assert np.median(prepared.image[1][inside]) == pytest.approx(100 / 300 * 2 - 1, abs=0.1)
    assert norm.range_of(arterial, 1) == (0.0, 300.0)
    with pytest.raises(ConfigError, match="channel 2 has none"):
        norm.range_of(arterial, 2)


def test_hand_crafted_lesions_also_stay_inside_the_head(brain, tmp_path):
    from synthlesion.pipelines.handcrafted import HandcraftedConfig, run_handcrafted

    out = tmp_path / "hc"
    report = run_handcrafted(
        brain["data"], brain["splits"], out, HandcraftedConfig(healthy_only=False, limit=3)
    )
    assert report.written
    for row in _rows(out / "manifest.jsonl"):
        source = row["source_case"]
        first = nib.load(brain["data"] / "imagesTr" / f"{source}_0000.nii.gz")
        head = foreground_mask(np.asarray(first.dataobj))
        labels = np.asarray(nib.load(out / row["mask"]).dataobj)
        before = np.asarray(nib.load(brain["data"] / "labelsTr" / f"{source}.nii.gz").dataobj)
        new = labels != before
        assert new.any() and not (new & ~head).any()


def test_training_blobs_stay_inside_the_users_region_masks(brain, tmp_path):
    from synthlesion.training.config import load_train_config
    from synthlesion.training.data import load_training_data
    from synthlesion.training.preprocess import to_ras

    regions = tmp_path / "regions"
    regions.mkdir()
    for path in sorted((brain["data"] / "brainmasks").glob("*.nii.gz")):
        volume = load_image(path)
        half = np.asarray(volume.array).copy()
        half[: half.shape[0] // 2] = 0  # only one hemisphere (in stored, LPS voxel order)
        save_image(volume.with_array(half), regions / path.name)
    raw = {
        "output_dir": str(tmp_path / "unused"),
        "data": {
            "dataset": str(brain["data"]),
            "splits": str(brain["splits"]),
            "roi_size": [16, 16, 16],
            "region_masks": str(regions),
        },  # fmt: skip
        "model": {"spatial_dims": 3, "image_channels": 4, "lesion_classes": 4},
    }
    data = load_training_data(load_train_config(raw).data, spatial_dims=3, seed=0)
    for prepared in data.train:
        allowed = to_ras(load_image(regions / f"{prepared.case_id}.nii.gz")).array > 0
        lesions = np.isin(prepared.labels, [1, 2, 3, 4])
        assert prepared.tissue.any() and not (prepared.tissue & ~(allowed | lesions)).any()
        assert all(allowed[tuple(c)] for c in prepared.healthy_centres)
