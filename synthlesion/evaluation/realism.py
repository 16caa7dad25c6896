"""Realism of synthetic lesions against ground truth: pure functions on numpy arrays.

* :func:`repaint_scores`: MSE, PSNR and SSIM of a region repainted by a generator against the
  real image there, with the BraTS 2023 local-inpainting normalisation.
* :func:`mean_fill` and :func:`copy_paste_fill`: the two trivial repaint generators every
  model has to beat (the ring mean; a real lesion from another case, contrast-matched).
* :func:`kid`: Kernel Inception Distance between two feature sets.
* :func:`classifier_two_sample_test`: can a small CNN tell real crops from synthetic ones?
  (ROC AUC with a 95% CI; 0.5 = indistinguishable).
* :func:`texture_shape_features` (from :mod:`synthlesion.evaluation.radiomics`) and
  :func:`feature_distribution_distances`: hand-crafted lesion features and how far apart their
  distributions are.

Every array is 2D ``(X, Y)`` or 3D ``(X, Y, Z)``, one code path for both; masks are non-zero
inside the lesion. Random functions take a ``seed`` and use their own generators, never the
global random state. Bad input raises :class:`ValueError` naming the problem.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from scipy.stats import ks_2samp, rankdata, wasserstein_distance
from skimage.metrics import structural_similarity

from synthlesion.data.boxes import bounding_box, distance_from
from synthlesion.evaluation.radiomics import check_spacing, texture_shape_features
from synthlesion.pipelines.quality import ring_width_mm

logger = logging.getLogger(__name__)

__all__ = [
    "classifier_two_sample_test",
    "copy_paste_fill",
    "feature_distribution_distances",
    "kid",
    "mean_fill",
    "repaint_scores",
    "texture_shape_features",
]


# --------------------------------------------------------------------------- input checks


def _check_mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} shape {mask.shape} differs from the image shape {shape}")
    if mask.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2D or 3D, got {mask.ndim}D")
    mask = mask if mask.dtype == bool else mask != 0
    if not mask.any():
        raise ValueError(f"{name} is empty")
    return mask


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a non-empty boolean mask."""
    box = bounding_box(mask)
    if box is None:
        raise ValueError("the mask is empty")
    return box


def _ring_mean(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, ...],
    ring_mm: float,
    tissue: np.ndarray | None,
) -> tuple[float, float]:
    """Mean and std of the ring around ``mask``, computed in a padded box around the mask.

    The distance transform runs on the box only, so the cost follows the lesion. The ring is
    the same as :func:`synthlesion.pipelines.quality.lesion_statistics`' (voxels outside the
    mask within :func:`ring_width_mm` of it), restricted to ``tissue`` when that leaves any.
    """
    width = ring_width_mm(spacing, ring_mm)
    near = distance_from(mask, width, spacing)  # in a box around the mask
    if near is None:
        raise ValueError("the mask is empty")
    box, outside = near
    ring = (outside > 0) & (outside <= width)
    if tissue is not None:
        restricted = ring & (np.asarray(tissue)[box] != 0)
        if restricted.any():
            ring = restricted
    if not ring.any():
        raise ValueError("the ring around the mask is empty (the mask fills the image)")
    values = image[box][ring].astype(np.float64)
    return float(values.mean()), float(values.std())


def _float_copy(image: np.ndarray) -> np.ndarray:
    return image.astype(np.result_type(image.dtype, np.float32), copy=True)


# --------------------------------------------------------------------------- repaint scores


def repaint_scores(truth: np.ndarray, painted: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MSE, PSNR and SSIM of a repainted region against the real image (BraTS 2023 style).

    Both images are divided by the maximum of ``truth`` inside ``mask`` (the BraTS 2023
    local-inpainting normalisation; values are not clipped afterwards). MSE and PSNR use the
    mask's voxels only. SSIM (``skimage.metrics.structural_similarity``, ``data_range=1``,
    uniform window of ``win_size`` = 7 or the largest odd size that fits the smallest side) is
    computed on the whole normalised image with every voxel outside the mask set to 0 in both
    images, and its map is averaged over the mask's voxels.

    Parameters
    ----------
    truth : np.ndarray
        Real image, shape ``S`` (2D or 3D, every side at least 3), intensities mapped to
        ``[0, 1]`` (any positive scale works: the scores do not change when both images are
        multiplied by one positive constant).
    painted : np.ndarray
        Repainted image, shape ``S``, same intensity scale as ``truth``.
    mask : np.ndarray
        Repainted region, shape ``S``, non-zero inside; must not be empty.

    Returns
    -------
    dict[str, float]
        ``mse`` (normalised units squared, 0 = identical), ``psnr`` (dB, data range 1.0;
        ``float("inf")`` when the region is identical), ``ssim`` (at most 1 = identical).

    Raises
    ------
    ValueError
        If shapes differ, the mask is empty, an image is not finite inside the mask, a side is
        shorter than 3 voxels, or the maximum of ``truth`` in the mask is not positive.
    """
    truth = np.asarray(truth, dtype=np.float64)
    painted = np.asarray(painted, dtype=np.float64)
    if truth.shape != painted.shape:
        raise ValueError(f"truth shape {truth.shape} and painted shape {painted.shape} differ")
    mask = _check_mask(mask, truth.shape)
    if min(truth.shape) < 3:
        raise ValueError(f"SSIM needs every side to be at least 3 voxels, got {truth.shape}")
    if not (np.all(np.isfinite(truth[mask])) and np.all(np.isfinite(painted[mask]))):
        raise ValueError("truth or painted has non-finite values inside the mask")
    peak = float(truth[mask].max())
    if peak <= 0:
        raise ValueError(
            f"the maximum of truth inside the mask is {peak}, not positive: map the images "
            "to [0, 1] first"
        )
    truth_in = np.where(mask, truth / peak, 0.0)
    painted_in = np.where(mask, painted / peak, 0.0)
    mse = float(np.mean((truth_in[mask] - painted_in[mask]) ** 2))
    psnr = float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))
    win_size = min(7, min(truth.shape))
    win_size -= 1 - win_size % 2  # odd
    _, ssim_map = structural_similarity(
        truth_in, painted_in, data_range=1.0, full=True, win_size=win_size
    )
    return {"mse": mse, "psnr": psnr, "ssim": float(ssim_map[mask].mean())}


# --------------------------------------------------------------------------- repaint generators


def mean_fill(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    ring_mm: float = 3.0,
    tissue: np.ndarray | None = None,
) -> np.ndarray:
    """The "mean fill" repaint generator: the mask set to the mean of a ring around it.

    The ring holds the voxels outside the mask within ``ring_width_mm(spacing, ring_mm)`` mm
    of it (at least 1.5 voxels; see :func:`synthlesion.pipelines.quality.ring_width_mm`), the
    same ring as :func:`~synthlesion.pipelines.quality.lesion_statistics`, restricted to
    ``tissue`` where that leaves any voxel. It is found in a box around the mask, so the cost
    follows the lesion, not the image (apart from the copy of the image returned).

    Parameters
    ----------
    image : np.ndarray
        Image, shape ``S`` (2D or 3D), any intensity units.
    mask : np.ndarray
        Region to fill, shape ``S``, non-zero inside; must not be empty.
    spacing : Sequence[float]
        Voxel size in mm, one value per axis.
    ring_mm : float, optional
        Ring width in mm.
    tissue : np.ndarray, optional
        Shape ``S``; non-zero where the ring may lie (e.g. the organ).

    Returns
    -------
    np.ndarray
        A copy of ``image``, shape ``S``, floating point (integer images become float32 or
        float64), with the mask's voxels set to the ring mean.

    Raises
    ------
    ValueError
        If shapes differ, the mask is empty, ``spacing`` does not match or the ring is empty.
    """
    image = np.asarray(image)
    mask = _check_mask(mask, image.shape)
    spacing = check_spacing(spacing, image.ndim)
    if tissue is not None and np.shape(tissue) != image.shape:
        raise ValueError(f"tissue shape {np.shape(tissue)} differs from the image shape")
    ring_mean, _ = _ring_mean(image, mask, spacing, ring_mm, tissue)
    filled = _float_copy(image)
    box = _box(mask)
    filled[box][mask[box]] = ring_mean
    return filled


def copy_paste_fill(
    image: np.ndarray,
    mask: np.ndarray,
    donor_image: np.ndarray,
    donor_mask: np.ndarray,
    *,
    match: Literal["ring", "mean_std", "none"] = "ring",
    tissue: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    ring_mm: float = 3.0,
    donor_tissue: np.ndarray | None = None,
) -> np.ndarray:
    """The copy-paste repaint generator: a real lesion from a donor, pasted into ``mask``.

    The donor crop is a box of the same size as the bounding box of ``mask``, centred on the
    donor mask's centroid (parts outside the donor image count as "no lesion"). Each voxel of
    ``mask`` takes the donor value at the same position in the crop where that is a donor
    lesion voxel, and the donor lesion's mean elsewhere. The contrast is then matched to the
    target site with the rings of :func:`mean_fill`:

    * ``match="ring"``: ``donor_value - donor_ring_mean + target_ring_mean`` (lesion-to-ring
      contrast kept);
    * ``match="mean_std"``: ``(donor_value - donor_ring_mean) / donor_ring_std *
      target_ring_std + target_ring_mean`` (contrast kept in units of the ring spread; falls
      back to ``"ring"`` when the donor ring is flat);
    * ``match="none"``: the donor values as they are.

    Parameters
    ----------
    image : np.ndarray
        Target image, shape ``S`` (2D or 3D).
    mask : np.ndarray
        Region to fill, shape ``S``, non-zero inside; must not be empty.
    donor_image : np.ndarray
        Donor image, shape ``S'`` with the same number of axes as ``S``, same intensity units
        and (assumed) the same spacing as ``image``.
    donor_mask : np.ndarray
        Donor lesion, shape ``S'``, non-zero inside; must not be empty.
    match : {"ring", "mean_std", "none"}, optional
        Contrast matching, see above.
    tissue, donor_tissue : np.ndarray, optional
        Where the target (donor) ring may lie, shape ``S`` (``S'``).
    spacing : Sequence[float], optional
        Voxel size in mm (default 1 mm per axis), for the ring width.
    ring_mm : float, optional
        Ring width in mm (at least 1.5 voxels).

    Returns
    -------
    np.ndarray
        A floating-point copy of ``image``, shape ``S``, with the mask's voxels replaced;
        every voxel outside the mask is unchanged.

    Raises
    ------
    ValueError
        If shapes or dimensions differ, a mask is empty, ``match`` is unknown or a ring is
        empty.
    """
    image = np.asarray(image)
    donor_image = np.asarray(donor_image)
    mask = _check_mask(mask, image.shape)
    donor_mask = _check_mask(donor_mask, donor_image.shape, "donor_mask")
    if donor_image.ndim != image.ndim:
        raise ValueError(f"donor is {donor_image.ndim}D but the image is {image.ndim}D")
    if match not in ("ring", "mean_std", "none"):
        raise ValueError(f"unknown match {match!r}; use 'ring', 'mean_std' or 'none'")
    spacing = check_spacing(spacing, image.ndim)
    for name, array, shape in (
        ("tissue", tissue, image.shape),
        ("donor_tissue", donor_tissue, donor_image.shape),
    ):
        if array is not None and np.shape(array) != shape:
            raise ValueError(f"{name} shape {np.shape(array)} differs from its image's {shape}")

    box = _box(mask)
    size = [b.stop - b.start for b in box]
    donor_box = _box(donor_mask)
    donor_coords = np.argwhere(donor_mask[donor_box]) + [b.start for b in donor_box]
    centroid = donor_coords.mean(axis=0)
    start = [int(round(c - (n - 1) / 2)) for c, n in zip(centroid, size, strict=True)]
    crop_values = np.zeros(size, dtype=np.float64)
    crop_lesion = np.zeros(size, dtype=bool)
    source, target = [], []
    for s, n, limit in zip(start, size, donor_image.shape, strict=True):
        lo, hi = max(s, 0), min(s + n, limit)
        source.append(slice(lo, max(lo, hi)))
        target.append(slice(lo - s, lo - s + max(0, hi - lo)))
    crop_values[tuple(target)] = donor_image[tuple(source)]
    crop_lesion[tuple(target)] = donor_mask[tuple(source)]
    donor_values = donor_image[donor_box][donor_mask[donor_box]].astype(np.float64)
    donor_mean = float(donor_values.mean())
    values = np.where(crop_lesion, crop_values, donor_mean)[mask[box]]

    if match != "none":
        donor_ring, donor_spread = _ring_mean(
            donor_image, donor_mask, spacing, ring_mm, donor_tissue
        )
        target_ring, target_spread = _ring_mean(image, mask, spacing, ring_mm, tissue)
        if match == "mean_std" and donor_spread > 0:
            values = (values - donor_ring) / donor_spread * target_spread + target_ring
        else:
            values = values - donor_ring + target_ring
    filled = _float_copy(image)
    filled[box][mask[box]] = values
    return filled


# --------------------------------------------------------------------------- KID


def _feature_matrix(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) array, got shape {array.shape}")
    if len(array) < 2:
        raise ValueError(f"{name} needs at least 2 rows, got {len(array)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite values")
    return array


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., 2018) between two feature sets.

    The unbiased estimate of the squared MMD with the polynomial kernel
    ``k(x, y) = (x . y / D + 1) ** 3``, on ``subsets`` random subsets of ``subset_size`` rows
    drawn without replacement from each side, averaged.

    Parameters
    ----------
    features_a, features_b : np.ndarray
        Feature sets, shapes ``(N_a, D)`` and ``(N_b, D)``, at least 2 rows each.
    subsets : int, optional
        Number of random subsets.
    subset_size : int, optional
        Rows per subset; default ``min(1000, N_a, N_b)``; between 2 and ``min(N_a, N_b)``.
        With the default and two sets of at most 1000 rows of equal size, every subset is
        the whole of both sets and the returned std is 0; pass a smaller ``subset_size`` for
        a spread.
    seed : int, optional
        Seed of the subset draws.

    Returns
    -------
    tuple[float, float]
        Mean and standard deviation of the estimate over the subsets (feature units to the
        sixth power over D^3; near 0, possibly slightly negative, for one distribution).

    Raises
    ------
    ValueError
        If an input is not ``(N, D)``, has fewer than 2 rows or non-finite values, the feature
        dimensions differ, or ``subsets`` / ``subset_size`` are out of range.
    """
    a = _feature_matrix(features_a, "features_a")
    b = _feature_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    size = min(1000, len(a), len(b)) if subset_size is None else int(subset_size)
    if not 2 <= size <= min(len(a), len(b)):
        raise ValueError(f"subset_size must lie in [2, {min(len(a), len(b))}], got {size}")
    rng = np.random.default_rng(seed)
    dim = a.shape[1]
    estimates = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        kxx = (x @ x.T / dim + 1.0) ** 3
        kyy = (y @ y.T / dim + 1.0) ** 3
        kxy = (x @ y.T / dim + 1.0) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1))
        estimates[i] = within - 2.0 * kxy.mean()
    return float(estimates.mean()), float(estimates.std())


# --------------------------------------------------------------------------- classifier test


def _auc_delong(negatives: np.ndarray, positives: np.ndarray) -> tuple[float, float]:
    """ROC AUC (P(positive scores higher), ties half) and its DeLong variance."""
    m, n = len(positives), len(negatives)
    ranks = rankdata(np.concatenate([positives, negatives]))
    auc = (ranks[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (ranks[:m] - rankdata(positives)) / n
    v01 = 1.0 - (ranks[m:] - rankdata(negatives)) / m
    variance = v10.var(ddof=1) / m + v01.var(ddof=1) / n
    return float(auc), float(variance)


def _classifier(spatial: tuple[int, ...], width: int = 8):
    """A small CNN: three conv-ReLU(-max-pool) blocks, global average, one logit."""
    from torch import nn

    conv = nn.Conv2d if len(spatial) == 2 else nn.Conv3d
    pool = nn.MaxPool2d if len(spatial) == 2 else nn.MaxPool3d
    average = nn.AdaptiveAvgPool2d if len(spatial) == 2 else nn.AdaptiveAvgPool3d
    layers: list[nn.Module] = []
    channels, size = 1, list(spatial)
    for out in (width, 2 * width, 4 * width):
        layers += [conv(channels, out, 3, padding=1), nn.ReLU(inplace=True)]
        kernel = tuple(2 if s >= 2 else 1 for s in size)
        if max(kernel) > 1:
            layers.append(pool(kernel))
            size = [s // k for s, k in zip(size, kernel, strict=True)]
        channels = out
    layers += [average(1), nn.Flatten(), nn.Linear(channels, 1)]
    return nn.Sequential(*layers)


def classifier_two_sample_test(
    crops_a: np.ndarray,
    crops_b: np.ndarray,
    *,
    folds: int = 5,
    epochs: int = 12,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 32,
    learning_rate: float = 3e-3,
) -> dict[str, float | int]:
    """Classifier two-sample test: can a small CNN tell crops of set a from set b?

    The larger set is subsampled (seeded) to the size of the smaller; both are split into
    ``folds`` stratified folds; per fold a small CNN (three conv blocks, ``Conv2d`` or
    ``Conv3d`` by the crops' dimensions) is trained from scratch with Adam and random flips to
    output set b (label 1) against set a (label 0), and scores its held-out fold. The
    out-of-fold scores are pooled into one ROC AUC with a 95% DeLong confidence interval.
    Intensities are standardised by the mean and std of all crops used (label-blind).

    Parameters
    ----------
    crops_a, crops_b : np.ndarray
        Crops, shapes ``(N_a, *C)`` and ``(N_b, *C)`` with ``C`` = ``(H, W)`` or
        ``(D, H, W)``, one channel, same ``C`` on both sides, any intensity units (both sides
        in the same units). Centre them on the lesions; 32 x 32 (2D) or up to 32^3 (3D) is the
        intended size -- 3D crops cost roughly ``D`` times more.
    folds : int, optional
        Number of cross-validation folds (at least 2).
    epochs : int, optional
        Training epochs per fold.
    seed : int, optional
        Seed of the subsampling, folds, initialisation, batches and flips. Results are
        deterministic for a seed on CPU; the global torch random state is left untouched.
    device : str, optional
        Torch device to train on.
    batch_size, learning_rate : optional
        Training batch size and Adam learning rate.

    Returns
    -------
    dict
        ``auc`` (0.5 = indistinguishable, 1 = set b always scored higher), ``ci_low``,
        ``ci_high`` (95% DeLong interval, clipped to [0, 1]), ``n_a`` and ``n_b`` (crops used
        per side after subsampling, equal), ``folds``.

    Raises
    ------
    ValueError
        If a side has fewer than ``folds`` crops, the crop shapes differ or are not 2D/3D, a
        crop is not finite, or ``folds`` < 2.
    """
    import torch
    import torch.nn.functional as F

    a = np.asarray(crops_a, dtype=np.float32)
    b = np.asarray(crops_b, dtype=np.float32)
    if a.ndim not in (3, 4) or b.ndim not in (3, 4):
        raise ValueError(
            f"crops must be (N, H, W) or (N, D, H, W) arrays, got {a.shape} and {b.shape}"
        )
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"crop shapes differ: {a.shape[1:]} and {b.shape[1:]}")
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if min(len(a), len(b)) < folds:
        raise ValueError(f"each side needs at least folds={folds} crops, got {len(a)} and {len(b)}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("crops have non-finite values")

    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    a = a[np.sort(rng.choice(len(a), n, replace=False))] if len(a) > n else a
    b = b[np.sort(rng.choice(len(b), n, replace=False))] if len(b) > n else b
    logger.info("classifier two-sample test: %d crops per side, %d folds", n, folds)
    data = np.concatenate([a, b])
    data = (data - data.mean()) / max(float(data.std()), 1e-8)
    labels = np.concatenate([np.zeros(n, np.float32), np.ones(n, np.float32)])
    fold_of = np.empty(2 * n, dtype=np.int64)
    for offset in (0, n):
        for k, chunk in enumerate(np.array_split(rng.permutation(n), folds)):
            fold_of[offset + chunk] = k

    torch_device = torch.device(device)
    spatial = tuple(data.shape[1:])
    x_all = torch.from_numpy(data[:, None]).to(torch_device)
    y_all = torch.from_numpy(labels).to(torch_device)
    scores = np.empty(2 * n, dtype=np.float64)
    fork = [torch_device.index or 0] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        for k in range(folds):
            train = torch.from_numpy(np.flatnonzero(fold_of != k)).to(torch_device)
            test = torch.from_numpy(np.flatnonzero(fold_of == k)).to(torch_device)
            model = _classifier(spatial).to(torch_device)
            optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
            model.train()
            for _ in range(epochs):
                order = train[torch.randperm(len(train), generator=generator).to(torch_device)]
                for batch in order.split(batch_size):
                    x = x_all[batch]
                    for axis in range(2, x.ndim):
                        flip = torch.rand(len(batch), generator=generator) < 0.5
                        flip = flip.to(torch_device).view(-1, *([1] * (x.ndim - 1)))
                        x = torch.where(flip, x.flip(axis), x)
                    loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y_all[batch])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
            model.eval()
            with torch.no_grad():
                scores[test.cpu().numpy()] = model(x_all[test])[:, 0].double().cpu().numpy()
    auc, variance = _auc_delong(scores[:n], scores[n:])
    half = 1.959963984540054 * math.sqrt(max(variance, 0.0))
    return {
        "auc": auc,
        "ci_low": max(0.0, auc - half),
        "ci_high": min(1.0, auc + half),
        "n_a": n,
        "n_b": n,
        "folds": folds,
    }


# --------------------------------------------------------------------------- feature distances


def feature_distribution_distances(
    reference: Sequence[Mapping[str, float]], other: Sequence[Mapping[str, float]]
) -> dict:
    """How far the distribution of each feature in ``other`` lies from ``reference``'s.

    Per feature present on both sides (only its finite values count; a feature without a
    finite value on either side is skipped): the two-sample Kolmogorov-Smirnov statistic
    (``scipy.stats.ks_2samp``, 0..1) and the 1-Wasserstein distance
    (``scipy.stats.wasserstein_distance``) divided by the reference's standard deviation (by
    the pooled one where the reference's is 0; 0 when both are constant and equal).

    Parameters
    ----------
    reference, other : Sequence[Mapping[str, float]]
        One feature dict per lesion (e.g. from :func:`texture_shape_features`); real lesions
        as the reference.

    Returns
    -------
    dict
        ``features``: ``{name: {"ks", "wasserstein_sd", "n_reference", "n_other"}}``;
        ``mean_ks`` and ``mean_wasserstein_sd``: means over those features; ``n_features``.

    Raises
    ------
    ValueError
        If a side is empty or no feature has finite values on both sides.
    """
    if not reference or not other:
        raise ValueError(
            f"both feature lists must be non-empty, got {len(reference)} and {len(other)}"
        )

    def column(rows: Sequence[Mapping[str, float]], name: str) -> np.ndarray:
        values = np.array([float(row[name]) for row in rows if name in row], dtype=np.float64)
        return values[np.isfinite(values)]

    names = sorted(set().union(*reference) & set().union(*other))
    per_feature: dict[str, dict[str, float | int]] = {}
    for name in names:
        ref, oth = column(reference, name), column(other, name)
        if ref.size == 0 or oth.size == 0:
            continue
        distance = float(wasserstein_distance(ref, oth))
        spread = float(ref.std()) or float(np.concatenate([ref, oth]).std())
        per_feature[name] = {
            "ks": float(ks_2samp(ref, oth).statistic),
            "wasserstein_sd": distance / spread if spread > 0 else 0.0,
            "n_reference": int(ref.size),
            "n_other": int(oth.size),
        }
    if not per_feature:
        raise ValueError("no feature has finite values on both sides")
    return {
        "features": per_feature,
        "mean_ks": float(np.mean([f["ks"] for f in per_feature.values()])),
        "mean_wasserstein_sd": float(np.mean([f["wasserstein_sd"] for f in per_feature.values()])),
        "n_features": len(per_feature),
    }
