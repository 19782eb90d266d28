"""Training's schedule rules: the stall restart and the early-stopping floor.

Validation is replaced by a scripted sequence so the rules are tested without
depending on how fast a tiny model learns.
"""

from __future__ import annotations

import math

import pytest

from retrieval.model import train
from retrieval.model.network import load_model


def _scripted_validation(monkeypatch, balanced: list[float] | float, scores=None):
    calls = {"n": 0}

    def fake(model, pre, train_x, train_y, val_x, val_y, device):
        i = calls["n"]
        calls["n"] += 1
        b = balanced if isinstance(balanced, float) else balanced[min(i, len(balanced) - 1)]
        score = scores(i) if scores else b
        return {
            "precision_at_1": b,
            "accuracy": b,
            "balanced_accuracy": b,
            "val_ce": 1.0,
            "score": score,
        }

    monkeypatch.setattr(train, "_validate", fake)
    return calls


def test_a_schedule_stuck_at_chance_restarts_at_half_the_rate(phantom_dir, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, 1 / 3)  # 3 classes: balanced accuracy at chance forever
    opts = train.TrainOptions(epochs=10, progress=False, num_workers=0, lr=1e-3, seed=5)
    report = train.train_model(phantom_dir / "manifest.csv", tmp_path / "m", opts)
    stall_epoch = math.ceil(train.STALL_FRACTION * 10)
    assert [a["lr"] for a in report.attempts] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert [a["seed"] for a in report.attempts] == [5, 6, 7]
    assert [a["stalled"] for a in report.attempts] == [True, True, False]
    assert [a["epochs_run"] for a in report.attempts[:2]] == [stall_epoch, stall_epoch]
    # the last schedule is never abandoned; the model records every attempt
    assert report.attempts[-1]["epochs_run"] >= math.ceil(train.MIN_EPOCH_FRACTION * 10)
    cfg = load_model(tmp_path / "m").config.training
    assert cfg["attempts"] == report.attempts and cfg["lr"] == pytest.approx(2.5e-4)


def test_a_learning_schedule_is_not_restarted(phantom_dir, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [0.4, 0.6, 0.8, 0.9])
    opts = train.TrainOptions(epochs=10, progress=False, num_workers=0)
    report = train.train_model(phantom_dir / "manifest.csv", tmp_path / "m", opts)
    assert len(report.attempts) == 1 and not report.attempts[0]["stalled"]


def test_early_stopping_waits_for_half_the_schedule(phantom_dir, tmp_path, monkeypatch):
    # best score at epoch 1, worse ever after: patience 1 alone would stop at epoch 2
    _scripted_validation(monkeypatch, 0.9, scores=lambda i: 1.0 if i == 0 else 0.5)
    opts = train.TrainOptions(epochs=10, patience=1, progress=False, num_workers=0)
    report = train.train_model(phantom_dir / "manifest.csv", tmp_path / "m", opts)
    assert report.epochs_run == math.ceil(train.MIN_EPOCH_FRACTION * 10)
    assert report.best_epoch == 1


def test_short_schedules_are_never_judged_stalled(phantom_dir, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, 1 / 3)
    opts = train.TrainOptions(epochs=train.STALL_MIN_EPOCHS - 1, progress=False, num_workers=0)
    report = train.train_model(phantom_dir / "manifest.csv", tmp_path / "m", opts)
    assert len(report.attempts) == 1


def test_a_val_split_of_one_class_is_never_judged(phantom_dir, tmp_path, monkeypatch):
    import pandas as pd

    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str, keep_default_na=False)
    df.loc[df["split"] == "val", "label"] = df.loc[df["split"] == "train", "label"].iloc[0]
    for col in ("image", "mask"):  # keep the paths valid from the new folder
        df[col] = [str(phantom_dir / p) if p else p for p in df[col]]
    df.to_csv(tmp_path / "one_class_val.csv", index=False)
    _scripted_validation(monkeypatch, 0.5)
    opts = train.TrainOptions(epochs=10, progress=False, num_workers=0)
    report = train.train_model(tmp_path / "one_class_val.csv", tmp_path / "m", opts)
    assert len(report.attempts) == 1
