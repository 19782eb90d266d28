"""The within-label probe: chance handling, and not fooled by label-associated attributes."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.audit.probe import cv_balanced_accuracy, probe_attribute

N, D = 240, 16


def _data(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, N)
    attr = rng.integers(0, 3, N)
    patients = np.array([f"p{i // 2}" for i in range(N)])  # two cases per patient
    return rng, labels, attr, patients


def test_encoded_attribute_is_found_within_labels():
    rng, labels, attr, patients = _data()
    x = rng.normal(0, 1, (N, D))
    x[np.arange(N), 2 + attr] += 4  # the attribute is linearly readable (one-hot)
    x[:, 1] += 3 * labels
    res = probe_attribute(x, attr, labels, patients, seed=0, shuffles=1)
    assert res.chance == pytest.approx(1 / 3)
    assert res.balanced_accuracy > 0.8
    assert res.margin > 0.4
    assert set(res.per_label) == {"0", "1", "2"}
    assert res.chance_permuted == pytest.approx(1 / 3, abs=0.15)


def test_random_embedding_is_at_chance():
    rng, labels, attr, patients = _data(1)
    x = rng.normal(0, 1, (N, D))
    res = probe_attribute(x, attr, labels, patients, seed=0, shuffles=0)
    assert res.chance == pytest.approx(1 / 3)
    assert abs(res.balanced_accuracy - res.chance) < 0.1
    assert res.chance_permuted is None  # no shuffles asked for


def test_attribute_associated_with_the_label_is_not_credited_to_the_embedding():
    """The embedding knows only the label; the attribute follows the label 85% of the time.

    A plain (across-label) probe would read the attribute at ~85%; within each label the
    embedding has nothing more to say, so the probe stays at chance.
    """
    rng, labels, _, patients = _data(2)
    attr = np.where(rng.random(N) < 0.85, labels, rng.integers(0, 3, N))
    x = rng.normal(0, 1, (N, D))
    x[:, 0] += 4 * labels
    naive = cv_balanced_accuracy(x, attr, patients)
    assert naive > 0.6
    res = probe_attribute(x, attr, labels, patients, seed=0, shuffles=0)
    assert res.balanced_accuracy < res.chance + 0.12


def test_binary_chance_missing_values_and_tiny_groups():
    rng, labels, _, patients = _data(3)
    attr = rng.integers(0, 2, N)
    attr[:10] = -1  # missing
    attr[labels == 0] = 0  # label 0: one group only -> skipped
    attr[np.flatnonzero(labels == 1)[0]] = 2  # a 1-case group in label 1 is dropped, not fatal
    x = rng.normal(0, 1, (N, D))
    res = probe_attribute(x, attr, labels, patients, seed=0, shuffles=0)
    assert "skipped" in res.per_label["0"]
    assert res.per_label["1"]["n_groups"] == 2
    assert res.chance == pytest.approx(0.5)
    assert res.n_cases == res.per_label["1"]["n"] + res.per_label["2"]["n"]


def test_nothing_to_probe():
    labels = np.array([0, 0, 1, 1])
    res = probe_attribute(np.zeros((4, 2)), np.array([0, 0, 1, 1]), labels)
    assert res.balanced_accuracy is None and res.chance is None and res.margin is None


def test_no_patient_ids_uses_plain_stratified_folds():
    rng, labels, attr, _ = _data(4)
    x = rng.normal(0, 1, (N, D))
    x[np.arange(N), 2 + attr] += 4
    res = probe_attribute(x, attr, labels, np.array([""] * N), seed=0, shuffles=0)
    assert res.balanced_accuracy > 0.8
