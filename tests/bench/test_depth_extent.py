"""bench/depth_extent.py: the extent code keeps vectors unit-norm and adds c^2 cos(dt)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from depth_extent import extent_code, weight_key, with_extent  # noqa: E402


def test_code_angle_follows_the_rank_and_the_cosine_decomposes():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    code = extent_code(np.array([1.0, 4.5]), ref)
    assert np.allclose(np.linalg.norm(code, axis=1), 1.0)
    assert np.allclose(code[0], [1.0, 0.0]) and np.allclose(code[1], [0.0, 1.0])  # 0 and pi/2
    rng = np.random.default_rng(0)
    e = rng.normal(size=(2, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    v = with_extent(e, code, 1.0)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    # cosine = (appearance + c^2 * cos(angle difference)) / (1 + c^2); here cos(pi/2) = 0
    assert v[0] @ v[1] == pytest.approx((e[0] @ e[1] + 0.0) / 2)


def test_weight_keys_have_no_dot():
    assert [weight_key(c) for c in (0.5, 1.0, 2.0)] == ["c0_5", "c1", "c2"]
