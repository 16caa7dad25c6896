"""Intensity normalisation to [-1, 1] and back."""

from __future__ import annotations

import numpy as np
import pytest

from synthlesion.data.intensity import IntensityNormaliser
from synthlesion.errors import ConfigError


def test_ct_window_round_trip():
    norm = IntensityNormaliser.for_modality("CT")
    hu = np.array([-1000, -200, 50, 300, 2000], dtype=np.int16)
    value_range = norm.range_of(hu)
    out = norm.normalise(hu, value_range)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(norm.denormalise(out[1:4], value_range), [-200, 50, 300], atol=1e-3)


def test_mri_percentiles_ignore_background():
    rng = np.random.default_rng(0)
    image = np.zeros((50, 50), np.float32)
    image[10:40, 10:40] = rng.uniform(100, 200, (30, 30))
    norm = IntensityNormaliser.for_modality("MRI")
    low, high = norm.range_of(image)
    assert 100 <= low < 102 and 198 < high <= 200
    out = norm.normalise(image, (low, high))
    assert out.min() == -1 and out.max() == 1


def test_bad_settings():
    with pytest.raises(ConfigError):
        IntensityNormaliser("window", (10, 5))
    with pytest.raises(ConfigError):
        IntensityNormaliser("zscore")  # type: ignore[arg-type]
