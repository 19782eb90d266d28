"""Temperature scaling and ECE on synthetic, deliberately miscalibrated logits."""

import numpy as np
from scipy.special import softmax

from retrieval.service import calibration as cal


def _miscalibrated(rng, n=3000, k=4, factor=3.0):
    """Labels drawn from softmax(z); the 'model' reports softmax(factor·z): over-confident."""
    z = 1.5 * rng.normal(size=(n, k))
    y = (softmax(z, 1).cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return softmax(factor * z, 1), y


def test_temperature_recovers_the_distortion_and_lowers_nll_and_ece():
    rng = np.random.default_rng(0)
    probs, y = _miscalibrated(rng)
    fit_p, fit_y, test_p, test_y = probs[:1500], y[:1500], probs[1500:], y[1500:]
    t = cal.fit_temperature(cal.as_logits(fit_p), fit_y)
    assert 2.4 < t < 3.6  # the over-confidence factor was 3
    after = cal.apply_temperature(test_p, t)
    logits = cal.as_logits(test_p)
    assert cal.nll(logits, test_y, t) < cal.nll(logits, test_y) - 0.1
    before_ece, after_ece = cal.ece(test_p, test_y), cal.ece(after, test_y)
    assert after_ece < before_ece / 2, (before_ece, after_ece)
    assert (after.argmax(1) == test_p.argmax(1)).all()  # temperature never changes the answer


def test_under_confident_logits_get_a_temperature_below_one():
    rng = np.random.default_rng(1)
    probs, y = _miscalibrated(rng, factor=0.4)
    t = cal.fit_temperature(cal.as_logits(probs), y)
    assert t < 0.6
    assert cal.ece(cal.apply_temperature(probs, t), y) < cal.ece(probs, y)


def test_ece_on_known_cases():
    probs = np.array([[1.0, 0.0]] * 4)
    assert cal.ece(probs, np.array([0, 0, 1, 1])) == 0.5  # always sure, right half the time
    probs = np.array([[0.75, 0.25]] * 4)
    assert abs(cal.ece(probs, np.array([0, 0, 0, 1]))) < 1e-12  # 75 % sure, 75 % right
    rel = cal.reliability(probs, np.array([0, 0, 0, 1]))
    assert sum(rel.count) == 4 and len(rel.count) == cal.N_BINS


def test_reliability_png_is_a_png():
    rng = np.random.default_rng(2)
    probs, y = _miscalibrated(rng, n=300)
    png = cal.reliability_png(
        {"before": cal.reliability(probs, y), "after": cal.reliability(probs**0.5, y)}
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
