"""Training's schedule rules: the stall restart and the early-stopping floor.

Validation is replaced by a scripted sequence so the rules are tested without
depending on how fast a tiny model learns.
"""

from __future__ import annotations

import math

import pytest

from retrieval.model import train
from retrieval.model.network import load_model


def _scripted_validation(monkeypatch, balanced: list[float] | float, scores=None, p1=None):
    """Validation replaced by a script: balanced accuracy per call (and precision@1: ``p1``,
    else the same as the balanced accuracy)."""
    calls = {"n": 0}

    def fake(model, pre, train_x, train_y, val_x, val_y, device):
        i = calls["n"]
        calls["n"] += 1
        b = balanced if isinstance(balanced, float) else balanced[min(i, len(balanced) - 1)]
        score = scores(i) if scores else b
        return {
            "precision_at_1": b if p1 is None else p1,
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


def test_a_val_split_of_one_class_is_never_judged(phantom_dir, tmp_path, monkeypatch, capsys):
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
    # no "does not beat chance (... chance 1.00)" against a chance level that does not exist
    out = capsys.readouterr()
    err = out.out + out.err
    assert "does not beat chance" not in err and "holds one label" in err


def test_a_small_val_split_is_replaced_and_said(tmp_path):
    import pandas as pd

    df = pd.DataFrame(
        {
            "split": ["train"] * 16 + ["val"] * 4,
            "patient_id": [f"p{i}" for i in range(20)],
            "case_id": [f"c{i}" for i in range(20)],
            "label": ["a", "b"] * 10,
        }
    )
    tr, va, note = train._split_val(df, 0)
    assert set(va["split"]) == {"train"} and len(va) == 2  # 15 % of 16 train patients
    assert set(tr.index) | set(va.index) == set(range(16))  # the val cases stay unseen
    assert "val split has 4 case(s)" in note and "4 val case(s) stay unseen" in note
    df.loc[df["split"] == "train", "split"] = ["val"] * 6 + ["train"] * 10
    tr, va, note = train._split_val(df, 0)
    assert note is None and len(va) == 10


def test_retrieval_off_chance_is_not_a_stall(phantom_dir, tmp_path, monkeypatch):
    # the head still at chance, retrieval well above it (seen: val P@1 0.84): keep training
    _scripted_validation(monkeypatch, 1 / 3, p1=0.84)
    opts = train.TrainOptions(epochs=10, progress=False, num_workers=0)
    report = train.train_model(phantom_dir / "manifest.csv", tmp_path / "m", opts)
    assert len(report.attempts) == 1 and not report.attempts[0]["stalled"]
    assert report.epochs_run > math.ceil(train.STALL_FRACTION * 10)


def test_the_stall_rule_needs_both_head_and_retrieval_at_chance():
    at_chance = {"balanced_accuracy": 0.35, "precision_at_1": 0.36}
    assert train.is_stalled(at_chance, 1 / 3, 1 / 3)
    assert not train.is_stalled(dict(at_chance, precision_at_1=0.84), 1 / 3, 1 / 3)
    assert not train.is_stalled(dict(at_chance, balanced_accuracy=0.7), 1 / 3, 1 / 3)
    # precision@1 is judged against its own chance level (an unbalanced gallery)
    assert not train.is_stalled(dict(at_chance, precision_at_1=0.5), 1 / 3, 0.2)


def test_the_report_counts_every_epoch_that_ran(phantom_dir, tmp_path, monkeypatch, capsys):
    """Abandoned schedules' epochs are counted and said (the log once said 30 when 39 ran)."""
    _scripted_validation(monkeypatch, 1 / 3)
    opts = train.TrainOptions(epochs=10, progress=False, num_workers=0)
    report = train.train_model(phantom_dir / "manifest.csv", tmp_path / "m", opts)
    ran = sum(a["epochs_run"] for a in report.attempts)
    assert len(report.attempts) == train.MAX_ATTEMPTS
    assert report.epochs_total == ran > report.epochs_run and report.max_epochs == 10
    text = report.summary()
    assert f"{report.epochs_run} of 10 epochs" in text and f"{ran} in all" in text
    cfg = load_model(tmp_path / "m").config.training
    assert cfg["epochs_total"] == ran and cfg["max_epochs"] == 10

    import argparse

    from retrieval.commands import train as train_cmd

    monkeypatch.setattr(train_cmd, "train_model", lambda *a, **k: report)
    args = argparse.Namespace(
        manifest="m.csv", out="o", epochs=None, backbone="compact", image_size=None,
        embedding_dim=128, batch_size=None, seed=0, device="cpu", strict=False,
    )  # fmt: skip
    train_cmd.run(args)
    assert f"{ran} in all" in capsys.readouterr().out


@pytest.mark.parametrize(
    "loss,instance", [("supcon", 0.5), ("multisimilarity", 0.0), ("triplet", 0.0)]
)
def test_each_loss_trains_and_is_recorded(phantom_dir, tmp_path, loss, instance):
    opts = train.TrainOptions(
        epochs=1, progress=False, num_workers=0, loss=loss, instance_weight=instance, width=8
    )
    report = train.train_model(phantom_dir / "manifest.csv", tmp_path / "m", opts)
    cfg = load_model(tmp_path / "m").config
    assert cfg.width == 8 and cfg.training["loss_options"]["loss"] == loss
    assert cfg.training["views"] == (2 if instance else 1)
    assert ("ntxent" in cfg.training["loss"]) == bool(instance)
    # 2-D images: no peak-pooled term, 24 cases a step (the volume recipe is in test_volume_cli)
    assert cfg.training["loss_options"]["peak_weight"] == 0.0 and "peak" not in cfg.training["loss"]
    assert report.history and all(math.isfinite(h["loss"]) for h in report.history)


def test_unknown_loss_is_a_clear_error(phantom_dir, tmp_path):
    from retrieval.errors import CasebaseError

    with pytest.raises(CasebaseError, match="unknown loss"):
        train.train_model(
            phantom_dir / "manifest.csv", tmp_path / "m", train.TrainOptions(loss="nope")
        )


def test_volumes_never_get_fewer_epochs_than_300_volumes_do():
    volumes_300 = 210 * 2  # train cases x views
    assert train.default_epochs(volumes_300) == train.MIN_VOLUME_EPOCHS  # the floor's origin
    assert train.default_epochs(volumes_300, volumes=True) == train.MIN_VOLUME_EPOCHS
    # 400 volumes: the budget alone shrinks the schedule; volumes keep the floor
    assert train.default_epochs(280 * 2) < train.MIN_VOLUME_EPOCHS
    assert train.default_epochs(280 * 2, volumes=True) == train.MIN_VOLUME_EPOCHS
    # images keep the sample budget, and small sets its ceiling
    assert train.default_epochs(840 * 2) == math.ceil(train.SAMPLE_BUDGET / (840 * 2))
    assert train.default_epochs(40, volumes=True) == train.default_epochs(40) == 40


def _mixed_manifest(root, n_images: int = 12, n_volumes: int = 4):
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(3)
    rows = []
    for i in range(n_images):
        arr = rng.integers(0, 255, (32, 32), np.uint8)
        Image.fromarray(arr).save(root / f"p{i}.png")
        split = "val" if i % 4 == 3 else "train"
        rows.append(
            {"case_id": f"p{i}", "image": f"p{i}.png", "label": "ab"[i % 2], "split": split}
        )
    for i in range(n_volumes):
        np.save(root / f"v{i}.npy", rng.random((12, 32, 32)).astype(np.float32))
        rows.append(
            {"case_id": f"v{i}", "image": f"v{i}.npy", "label": "ab"[i % 2], "split": "train"}
        )
    pd.DataFrame(rows).to_csv(root / "m.csv", index=False)
    return root / "m.csv"


def test_training_a_mix_of_volumes_and_images_warns_once(tmp_path, capsys):
    """A 2-D model silently read volumes as their middle slice; now train says so, once."""
    from retrieval.cli import main
    from retrieval.data.manifest import mixed_dimensions_note

    manifest = _mixed_manifest(tmp_path)
    argv = ["train", str(manifest), "--out", str(tmp_path / "model"), "--epochs", "1"]
    assert main([*argv, "--backbone", "compact", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("the manifest mixes") == 1
    assert f"warning: {mixed_dimensions_note(4, 12)}" in text
    assert "4 volumes and 12 2-D images" in text and "middle axial slice" in text
    # images only: no warning
    for i in range(4):
        (tmp_path / f"v{i}.npy").unlink()
    import pandas as pd

    df = pd.read_csv(manifest)
    df[~df["image"].str.endswith(".npy")].to_csv(manifest, index=False)
    assert main([*argv, "--backbone", "compact", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "the manifest mixes" not in out.out + out.err
