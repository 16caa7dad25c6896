"""Typed lesions of the embedded phantom, and the old ellipsoid model kept byte for byte."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from synthlesion.data.phantom import (
    PhantomCase,
    PhantomLesion,
    PhantomOutputError,
    make_phantom_dataset,
    make_phantom_patient,
)
from synthlesion.data.phantom_anatomy import crop
from synthlesion.data.phantom_lesion_render import mass_effect_coords
from synthlesion.data.phantom_lesion_types import (
    LESION_TYPES,
    draw_lesion_type,
    place_typed_lesions,
)
from synthlesion.errors import ConfigError

# sha256 of (image, label) bytes per case, recorded from the ellipsoid-only phantom before the
# typed lesions were added (commit 168fc95); the ellipsoid model must keep reproducing them.
ELLIPSOID_HASHES = {
    ("ct", 2, 3, 1, 2, 64, 0): [
        (
            "0015b8ef15ce9cdd4bc904605ed9551637fcffa0b726609a73b6725ccaa5a1c1",
            "462fb1498ac8b324c38bbc75745a7a2b98c0ba83ae5fd4e524865eca8227bc02",
        )
    ],
    ("mri", 3, 1, 1, 2, 32, 0): [
        (
            "2397630bbafcb6e863854bb8914300ff6f2103033e9e6a3d638b62048cce3a08",
            "82f024d6924bec1e70e2df2e9cb145abae293d3d4ae05efe45dd0791df110ba1",
        )
    ],
    ("ct", 3, 0, 2, 2, 32, 1): [
        (
            "cac8297147c05572ad096310e62e115d137ea2741e4429f70ca1a9a91e210f43",
            "4591ff2fed5ea040b24f052795f6c2f3f944a5c989bfcdd6174f299631126b2c",
        ),
        (
            "d122e0a829a09c4fcd8bb49fbcf0aa482ec02522c2af5411a1f8eff9724b0bcc",
            "99370ce5e2f710a88f2ea22a78cc81a9b736e1bdf7703279db0463a82f287a4f",
        ),
    ],
}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.mark.parametrize("key", list(ELLIPSOID_HASHES))
def test_ellipsoid_model_reproduces_the_old_phantom(key: tuple) -> None:
    kind, dims, index, n_tp, n_les, size, seed = key
    cases = make_phantom_patient(
        kind,
        dims,
        patient_index=index,
        n_time_points=n_tp,
        n_lesions=n_les,
        size=size,
        seed=seed,
        lesion_model="ellipsoid",
    )
    got = [(_sha(c.image.array), _sha(c.label.array)) for c in cases]
    assert got == ELLIPSOID_HASHES[key]
    for case in cases:
        for lesion in case.lesions:
            assert lesion.lesion_type == lesion.appearance
            assert lesion.to_json()["type"] == lesion.appearance


# --- the typed model ----------------------------------------------------------------------


def _components(label: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(label == 2)


def _lesion_masks(case: PhantomCase) -> list[tuple[PhantomLesion, np.ndarray]]:
    """Each truth lesion with its own mask (the component under its centroid)."""
    components, _ = _components(case.label.array)
    out = []
    for lesion in case.lesions:
        index = components[tuple(np.round(lesion.centre_voxel).astype(int))]
        assert index > 0
        out.append((lesion, components == index))
    return out


@pytest.fixture(scope="module")
def typed_2d() -> dict[str, list[PhantomCase]]:
    """Many 2D typed patients of both kinds at the benchmark size (128)."""
    return {
        "ct": [
            make_phantom_patient("ct", 2, patient_index=i, n_lesions=2, size=128, seed=5)[0]
            for i in range(60)
        ],
        "mri": [
            make_phantom_patient("mri", 2, patient_index=i, n_lesions=2, size=128, seed=5)[0]
            for i in range(40)
        ],
    }


def _per_type(cases: list[PhantomCase], stat, min_inner: int = 25) -> dict[str, list[float]]:
    """``stat(image, label, mask, inner, case)`` per lesion with an interior of enough pixels."""
    out: dict[str, list[float]] = {}
    for case in cases:
        image = case.image.array.astype(np.float64)
        for lesion, mask in _lesion_masks(case):
            inner = ndimage.binary_erosion(mask)
            if inner.sum() < min_inner:
                continue
            value = stat(image, case.label.array, mask, inner, case)
            if value is not None:
                out.setdefault(lesion.lesion_type, []).append(float(value))
    return out


def test_typed_model_is_deterministic_and_seeded() -> None:
    kwargs = dict(patient_index=4, n_time_points=2, n_lesions=3, size=96, seed=7)
    a = make_phantom_patient("ct", 2, **kwargs)
    b = make_phantom_patient("ct", 2, **kwargs)
    c = make_phantom_patient("ct", 2, **{**kwargs, "seed": 8})
    for x, y in zip(a, b, strict=True):
        assert _sha(x.image.array) == _sha(y.image.array)
        assert _sha(x.label.array) == _sha(y.label.array)
        assert x.lesions == y.lesions
    assert _sha(a[0].image.array) != _sha(c[0].image.array)
    m1, m2 = (make_phantom_patient("mri", 3, n_lesions=2, size=32, seed=1)[0] for _ in range(2))
    assert _sha(m1.image.array) == _sha(m2.image.array)
    assert _sha(m1.label.array) == _sha(m2.label.array)
    # a follow-up keeps each lesion's type and scales it
    assert [x.lesion_type for x in a[0].lesions] == [x.lesion_type for x in a[1].lesions]
    ratios = {
        round(r1 / r0, 6)
        for x0, x1 in zip(a[0].lesions, a[1].lesions, strict=True)
        for r0, r1 in zip(x0.radii_mm, x1.radii_mm, strict=True)
    }
    assert len(ratios) == 1 and ratios != {1.0}
    # the anatomy is the same for both models (only the lesions and mass effect differ)
    (old,) = make_phantom_patient("ct", 2, n_lesions=0, size=64, lesion_model="ellipsoid")
    (new,) = make_phantom_patient("ct", 2, n_lesions=0, size=64)
    assert _sha(old.image.array) == _sha(new.image.array)


def test_dataset_records_the_model_and_types(tmp_path: Path) -> None:
    kwargs = dict(kind="ct", spatial_dims=2, n_patients=3, size=48, seed=2, lesion_fraction=1.0)
    a = make_phantom_dataset(tmp_path / "a", **kwargs)
    b = make_phantom_dataset(tmp_path / "b", **kwargs)
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    for rel in files:
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes(), rel
    spec = json.loads(a.read_text())
    assert spec["synthlesion"]["lesion_model"] == "types"
    names = {t.name for t in LESION_TYPES["ct"]}
    lesions = [x for entry in spec["training"] for x in entry["lesions"]]
    assert lesions and all(x["type"] in names for x in lesions)
    assert all(x["appearance"] in ("hypodense", "hyperdense") for x in lesions)
    # a folder written with the other model is not silently reused
    with pytest.raises(PhantomOutputError):
        make_phantom_dataset(tmp_path / "a", lesion_model="ellipsoid", **kwargs)
    make_phantom_dataset(tmp_path / "a", lesion_model="ellipsoid", overwrite=True, **kwargs)
    spec = json.loads(a.read_text())
    assert spec["synthlesion"]["lesion_model"] == "ellipsoid"
    lesions = [x for entry in spec["training"] for x in entry["lesions"]]
    assert lesions and all(x["type"] == x["appearance"] for x in lesions)
    with pytest.raises(ConfigError):
        make_phantom_dataset(tmp_path / "c", lesion_model="blob", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        make_phantom_patient("ct", 2, size=32, lesion_model="blob")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_types_appear_with_their_frequencies(
    kind: str, typed_2d: dict[str, list[PhantomCase]]
) -> None:
    table = {t.name: t.frequency for t in LESION_TYPES[kind]}
    assert sum(table.values()) == pytest.approx(1.0)
    assert len(table) >= 3
    rng = np.random.default_rng(0)
    n = 20000
    drawn = Counter(draw_lesion_type(rng, kind).name for _ in range(n))
    for name, frequency in table.items():
        assert drawn[name] / n == pytest.approx(frequency, abs=0.015), name
    placed = Counter(x.lesion_type for case in typed_2d[kind] for x in case.lesions)
    total = sum(placed.values())
    assert total >= 1.5 * len(typed_2d[kind])  # nearly every patient got its 2 lesions
    for name, frequency in table.items():
        assert placed[name] / total == pytest.approx(frequency, abs=0.12), (name, placed)


def test_sizes_show_interior_structure_at_128(typed_2d: dict[str, list[PhantomCase]]) -> None:
    radii = [max(x.radii_mm) for case in typed_2d["ct"] for x in case.lesions]
    assert min(radii) >= 5.6 and max(radii) <= 32.0  # two pixels .. the table's largest
    assert np.percentile(radii, 10) < 10 and np.percentile(radii, 90) > 20  # a distribution
    pixels = [x.volume_voxels for case in typed_2d["ct"] for x in case.lesions]
    assert max(pixels) > 150  # large ones span > 14 pixels across at 2.8 mm


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_masks_are_crisp_filled_components_inside_the_organ(
    kind: str, typed_2d: dict[str, list[PhantomCase]]
) -> None:
    for case in typed_2d[kind]:
        label = case.label.array
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2}
        _, n = _components(label)
        assert n == len(case.lesions)
        lesion = label == 2
        assert (label[ndimage.binary_dilation(lesion)] > 0).all()  # surrounded by organ
        for truth, mask in _lesion_masks(case):
            assert int(mask.sum()) == truth.volume_voxels
            assert (ndimage.binary_fill_holes(mask) == mask).all()
            assert truth.appearance in ("hypodense", "hyperdense", "hyperintense", "necrotic")


def _sd_over_noise(image, label, mask, inner, case) -> float:
    return image[inner].std() / case.noise_sd


def test_interiors_heterogeneous_but_cysts_homogeneous(
    typed_2d: dict[str, list[PhantomCase]],
) -> None:
    ct = _per_type(typed_2d["ct"], _sd_over_noise)
    mri = _per_type(typed_2d["mri"], _sd_over_noise)
    assert np.median(ct["cyst"]) < 1.15 and np.percentile(ct["cyst"], 90) < 1.35
    assert np.median(ct["metastasis"]) > 1.5  # rim, core, mottling: well above the noise
    assert np.median(ct["hcc"]) > 1.3  # mosaic, capsule, necrosis, calcifications
    assert np.median(mri["glioma"]) > 2.5  # bright rim around a darker core
    assert np.median(mri["metastasis"]) > 1.5
    # calcification specks: a few very bright pixels in some HCCs (far above the liver)
    bright = 0
    for case in typed_2d["ct"]:
        image = case.image.array.astype(np.float64)
        liver = np.median(image[case.label.array == 1])
        for truth, mask in _lesion_masks(case):
            if truth.lesion_type == "hcc":
                bright += int(((image > liver + 120) & mask).sum() > 0)
    assert bright >= 3


def _halo(image, label, mask, inner, case) -> float | None:
    """Median of the band 1-3 pixels outside the mask minus the far organ, in noise sd."""
    lesions = label == 2
    band = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask)
    band &= (label == 1) & ~ndimage.binary_dilation(lesions & ~mask, iterations=3)
    far = (label == 1) & ~ndimage.binary_dilation(lesions, iterations=12)
    if band.sum() < 10 or far.sum() < 50:
        return None
    return (np.median(image[band]) - np.median(image[far])) / case.noise_sd


def test_halo_changes_the_tissue_outside_the_mask(typed_2d: dict[str, list[PhantomCase]]) -> None:
    ct = _per_type(typed_2d["ct"], _halo, min_inner=0)
    mri = _per_type(typed_2d["mri"], _halo, min_inner=0)
    # CT metastases: a hypodense band around them, unlike cysts (no halo)
    assert np.mean(ct["metastasis"]) < -0.3
    assert abs(np.mean(ct["cyst"])) < 0.25
    assert np.mean(ct["metastasis"]) < np.mean(ct["cyst"]) - 0.3
    # MRI gliomas and metastases: bright oedema around them, unlabelled
    assert np.median(mri["glioma"]) > 1.0 and np.median(mri["metastasis"]) > 1.0
    assert np.median(mri["glioma"]) > np.median(mri["ms_plaque"]) + 1.0


def _lag_ratio(image, label, mask, inner, case) -> float:
    """GLCM-like contrast (mean squared difference) at lag 1 over lag 3 pixels."""

    def contrast(lag: int) -> float:
        return float(
            np.mean(
                [
                    np.mean((image - np.roll(image, s * lag, axis))[inner] ** 2)
                    for axis in (0, 1)
                    for s in (1, -1)
                ]
            )
        )

    return contrast(1) / contrast(3)


def _tangential_over_radial(image, label, mask, inner, case) -> float:
    """Gradient energy across the rays from the centre over that along them."""
    centre = np.argwhere(mask).mean(axis=0)
    gi, gj = np.gradient(image)
    ii, jj = np.nonzero(inner)
    ri, rj = ii - centre[0], jj - centre[1]
    norm = np.hypot(ri, rj) + 1e-6
    radial = (gi[inner] * ri + gj[inner] * rj) / norm
    tangential = (gj[inner] * ri - gi[inner] * rj) / norm
    return float(np.mean(tangential**2) / np.mean(radial**2))


def _iqr(image, label, mask, inner, case) -> float:
    q1, q3 = np.percentile(image[inner], [25, 75])
    return float(q3 - q1)


def test_texture_statistics_differ_by_type(typed_2d: dict[str, list[PhantomCase]]) -> None:
    cases = typed_2d["ct"]
    lag = _per_type(cases, _lag_ratio)
    direction = _per_type(cases, _tangential_over_radial)
    iqr = _per_type(cases, _iqr)
    med = {k: {t: float(np.median(v)) for t, v in d.items()} for k, d in
           (("lag", lag), ("dir", direction), ("iqr", iqr))}  # fmt: skip
    # granular mottling (metastasis) has more fine-scale energy than a smooth cyst
    assert med["lag"]["metastasis"] > med["lag"]["cyst"] + 0.1
    # mosaic nodules (HCC) vary at a coarser scale than the granular metastases
    assert med["lag"]["hcc"] < med["lag"]["metastasis"]
    # fibrous radial strands (infiltrative) vary across the rays, rims and cores along them
    assert med["dir"]["infiltrative"] > 2 * med["dir"]["metastasis"]
    assert med["dir"]["infiltrative"] > 1.5 * med["dir"]["hcc"]
    # intensity distributions, not just means: a cyst's spread is the noise's
    assert med["iqr"]["hcc"] > 1.4 * med["iqr"]["cyst"]
    assert med["iqr"]["metastasis"] > 1.4 * med["iqr"]["cyst"]


# --- mass effect ------------------------------------------------------------------------------


def test_mass_effect_pushes_the_organ_boundary_outward() -> None:
    checked = 0
    for index in range(40):
        kwargs = dict(patient_index=index, n_lesions=1, size=128, seed=0)
        (pushed,) = make_phantom_patient("ct", 2, **kwargs)
        if not pushed.lesions or pushed.lesions[0].lesion_type not in ("hcc", "cyst"):
            continue
        lesion = pushed.lesions[0]
        if max(lesion.radii_mm) < 14:
            continue
        (still,) = make_phantom_patient("ct", 2, mass_effect=False, **kwargs)
        a, b = pushed.label.array, still.label.array
        assert ((a == 2) == (b == 2)).all()  # the same lesion
        changed = np.argwhere(a != b)
        if changed.size == 0:
            continue
        # only near the lesion: within 3 equivalent radii (plus a pixel)
        radius_px = float(np.prod(lesion.radii_mm)) ** (1 / 3) / pushed.image.spacing[0]
        dist = np.linalg.norm(changed - np.asarray(lesion.centre_voxel), axis=1)
        assert dist.max() <= 3 * radius_px + 1.5
        grew = ((a >= 1) & (b == 0)).sum()
        shrank = ((a == 0) & (b >= 1)).sum()
        assert grew > shrank  # pushed outward
        assert not np.array_equal(pushed.image.array, still.image.array)
        checked += 1
        if checked == 3:
            break
    assert checked >= 2


def test_mass_effect_displacement_field() -> None:
    # lesions placed in a big round organ on a 2D grid, their push checked along rays
    n, spacing = 96, (1.5, 1.5, 3.75)
    axis = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(spacing[0])
    p = (axis.reshape(n, 1), axis.reshape(1, n), np.zeros((1, 1), np.float32))
    region = (p[0] ** 2 + p[1] ** 2) < 65.0**2
    specs: list = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        specs += place_typed_lesions(rng, "ct", 1, region, p, spacing, 60.0, 1)
    pushers = [s for s in specs if s.mass > 0]
    assert len(pushers) >= 5
    for spec in pushers[:5]:
        r_eq = spec.radius
        box, q = mass_effect_coords(p, [spec], 0, region.shape)
        base = [np.broadcast_to(c, q[0].shape) for c in crop(p, box)]
        c = np.asarray(spec.centre, np.float32)
        r = np.sqrt(sum((base[i] - c[i]) ** 2 for i in range(3)))
        rq = np.sqrt(sum((q[i] - c[i]) ** 2 for i in range(3)))
        shift = r - rq
        assert (shift >= -1e-3).all()  # anatomy only ever comes from closer to the centre
        at_rim = np.abs(r / r_eq - 1) < 0.05
        assert np.allclose(shift[at_rim], spec.mass * r_eq, rtol=0.02, atol=0.05)
        assert np.abs(shift[r > 3 * r_eq]).max() < 1e-3
        # one-to-one: the pushed radius grows with the radius
        order = np.argsort(r.ravel())
        assert (np.diff(rq.ravel()[order]) > -0.05).all()
    infiltrative = [s for s in specs if s.name == "infiltrative"]
    assert infiltrative  # infiltrative lesions replace tissue and push nothing
    assert mass_effect_coords(p, infiltrative, 0, region.shape) is None
