"""Intensity transforms: each does what it says (the shared contract is in test_augment_contract)."""

from __future__ import annotations

import itertools

import pytest
import torch

from synthlesion.augment import (
    APPLIED_KEY,
    HistogramMatching,
    RandBiasField,
    RandContrastBrightness,
    RandGamma,
    RandGaussianNoise,
    RandGhosting,
    RandHistogramShift,
    RandHUWindow,
    RandLowResolution,
    RandMotion,
    RandRicianNoise,
    RandSpike,
)
from synthlesion.augment.intensity import monomials


def smooth(shape=(24, 26, 28), batch=2, offset=2.0) -> torch.Tensor:
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = torch.cos(2 * axes[0]) + torch.sin(3 * axes[1]) * axes[-1] + offset
    return img[None, None].repeat(batch, 1, *([1] * len(shape))).contiguous()


def test_gaussian_noise_std_and_mean() -> None:
    x = torch.zeros(2, 1, 64, 64, 64) + 3.0
    out = RandGaussianNoise("image", std=0.2, mean=0.5, seed=0)({"image": x})["image"]
    noise = out - x
    assert abs(noise.std().item() - 0.2) < 0.005
    assert abs(noise.mean().item() - 0.5) < 0.005
    assert not torch.allclose(noise[0], noise[1])  # per-sample fields differ


def test_noise_differs_between_keys() -> None:
    x = torch.zeros(1, 1, 16, 16) + 3.0
    out = RandGaussianNoise(["a", "b"], std=0.1, seed=0)({"a": x, "b": x})
    assert not torch.equal(out["a"], out["b"])


def test_rician_noise_is_nonnegative_and_biased_up_in_background() -> None:
    x = torch.zeros(1, 1, 32, 32, 32)
    x[..., 16:] = 5.0
    out = RandRicianNoise("image", std=0.3, seed=0)({"image": x})["image"]
    assert bool((out >= 0).all())
    background = out[..., :16].mean().item()
    assert abs(background - 0.3 * (torch.pi / 2) ** 0.5) < 0.02  # Rayleigh mean


@pytest.mark.parametrize("nd", [2, 3])
def test_bias_field_matches_direct_polynomial(nd: int) -> None:
    shape = (9, 11, 13)[:nd]
    x = smooth(shape, batch=2)
    t = RandBiasField("image", coefficients=(-0.4, 0.4), order=2, seed=1)
    out = t({"image": x})
    coeffs = out[APPLIED_KEY][0]["params"]["coefficients"]
    axes = torch.meshgrid(
        *[torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape], indexing="ij"
    )
    for b in range(2):
        field = torch.zeros(shape, dtype=torch.float64)
        for c, exps in zip(coeffs[b], monomials(2, nd), strict=True):
            term = torch.ones(shape, dtype=torch.float64)
            for a, e in zip(axes, exps, strict=True):
                term = term * a**e
            field = field + c * term
        want = x[b, 0].double() * torch.exp(field)
        torch.testing.assert_close(out["image"][b, 0].double(), want, rtol=1e-5, atol=1e-5)


def test_monomial_count() -> None:
    assert len(monomials(3, 3)) == 20 and len(monomials(3, 2)) == 10
    assert all(sum(e) <= 3 for e in monomials(3, 3))


def test_gamma_formula_and_range_kept() -> None:
    x = smooth(batch=1)
    out = RandGamma("image", log_gamma=0.4, seed=0)({"image": x})["image"]
    low, high = x.min(), x.max()
    want = ((x - low) / (high - low)) ** torch.exp(torch.tensor(0.4)) * (high - low) + low
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert abs(out.min() - low) < 1e-5 and abs(out.max() - high) < 1e-5


def test_gamma_constant_image_unchanged() -> None:
    x = torch.full((1, 1, 8, 8), 2.0)
    out = RandGamma("image", log_gamma=0.5, seed=0)({"image": x})["image"]
    assert torch.equal(out, x)


def test_contrast_brightness() -> None:
    x = smooth(batch=1)
    out = RandContrastBrightness("image", contrast=2.0, brightness=0.5, seed=0)({"image": x})
    y = out["image"]
    assert abs((y.mean() - x.mean()).item() - 0.5) < 1e-4
    assert abs(y.std().item() / x.std().item() - 2.0) < 1e-4


def test_hu_window_fixed_and_jittered() -> None:
    hu = torch.linspace(-1000, 1000, 2001).view(1, 1, 1, 2001).repeat(2, 1, 2, 1)
    fixed = RandHUWindow("ct", center=40, width=400, center_shift=0, width_scale=1.0, seed=0)
    out = fixed({"ct": hu})["ct"]
    assert out.min() == 0 and out.max() == 1
    idx = lambda v: int(v) + 1000  # noqa: E731
    assert out[0, 0, 0, idx(-160)] == 0 and out[0, 0, 0, idx(240)] == 1
    assert abs(out[0, 0, 0, idx(40)].item() - 0.5) < 1e-6
    jitter = RandHUWindow("ct", center=40, width=400, seed=0)({"ct": hu})
    params = jitter[APPLIED_KEY][0]["params"]
    assert bool(((params["center"] - 40).abs() <= 20).all())
    assert bool(((params["width"] / 400 - 1).abs() <= 0.1 + 1e-9).all())


def test_histogram_matching_reaches_reference_quantiles() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 40, 40, 40, generator=gen) ** 2 * 100
    reference = torch.randn(50_000, generator=gen) * 5 + 20
    out = HistogramMatching("image", reference=reference, seed=0)({"image": x})["image"]
    levels = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    want = torch.quantile(reference, levels)
    for b in range(2):
        got = torch.quantile(out[b].flatten(), levels)
        torch.testing.assert_close(got, want, rtol=0, atol=0.15)
    ranks_in = x[0].flatten().argsort()
    assert bool((out[0].flatten()[ranks_in].diff() >= -1e-4).all())  # monotone mapping


def test_histogram_shift_monotone_and_range_kept() -> None:
    x = smooth(batch=2)
    out = RandHistogramShift("image", num_control_points=6, shift=(-0.1, 0.1), seed=3)(
        {"image": x}
    )["image"]
    assert not torch.allclose(out, x)
    for b in range(2):
        order = x[b].flatten().argsort()
        assert bool((out[b].flatten()[order].diff() >= -1e-5).all())
        assert abs(out[b].min() - x[b].min()) < 1e-5 and abs(out[b].max() - x[b].max()) < 1e-5


def test_low_resolution_factor_one_is_identity_and_blurs_otherwise() -> None:
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    same = RandLowResolution("image", factor=1.0, seed=0)({"image": x})["image"]
    assert torch.equal(same, x)
    thick = RandLowResolution("image", factor=(1.0, 1.0, 4.0), seed=0)({"image": x})["image"]
    # high frequencies along the last axis are gone, the other axes keep more detail
    assert thick.diff(dim=-1).abs().mean() < 0.5 * x.diff(dim=-1).abs().mean()
    assert thick.shape == x.shape


def test_ghosting_zero_intensity_is_identity() -> None:
    x = smooth(shape=(32, 32), batch=2)
    out = RandGhosting("image", intensity=0.0, seed=0)({"image": x})["image"]
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    box = torch.zeros(1, 1, 32, 32)
    box[..., 10:22, 8:20] = 2.0
    ghost = RandGhosting("image", intensity=1.0, num_ghosts=4, axes=(0,), seed=0)({"image": box})
    assert (ghost["image"] - box)[..., :8, 8:20].abs().max() > 0.05  # ghosts outside the box


def test_spike_adds_a_periodic_pattern() -> None:
    x = smooth(shape=(32, 32), batch=1)
    none = RandSpike("image", num_spikes=0, seed=0)({"image": x})["image"]
    torch.testing.assert_close(none, x, rtol=1e-5, atol=1e-5)
    out = RandSpike("image", num_spikes=1, intensity=0.5, seed=0)({"image": x})["image"]
    assert (out - x).abs().max() > 0.1


def test_motion_none_is_identity_and_motion_changes() -> None:
    x = smooth(shape=(24, 24, 24), batch=2)
    still = RandMotion("image", num_transforms=0, seed=0)({"image": x})["image"]
    torch.testing.assert_close(still, x, rtol=1e-5, atol=1e-5)
    moved = RandMotion("image", num_transforms=2, degrees=(5, 10), translation=(2, 4), seed=0)(
        {"image": x, "spacing": (1.0, 1.0, 2.0)}
    )["image"]
    assert (moved - x).abs().mean() > 0.01


@pytest.mark.parametrize(
    "transform",
    [
        RandGaussianNoise("image", std=0.1),
        RandBiasField("image"),
        RandGamma("image"),
        RandContrastBrightness("image"),
        RandHistogramShift("image"),
    ],
    ids=lambda t: t.name,
)
def test_half_precision_images(transform) -> None:
    x = smooth(shape=(8, 8, 8)).to(torch.bfloat16)
    out = transform.set_random_state(0)({"image": x})["image"]
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all())


def test_parameter_grid_per_sample() -> None:
    x = smooth(shape=(8, 8), batch=6)
    out = RandGamma("image", log_gamma=(-0.3, 0.3), p=0.5, seed=4)({"image": x})
    record = out[APPLIED_KEY][0]
    applied = record["applied"]
    assert applied.shape == (6,) and 0 < int(applied.sum()) < 6
    for b, flag in itertools.product(range(6), [None]):
        del flag
        if not applied[b]:
            assert torch.equal(out["image"][b], x[b])
