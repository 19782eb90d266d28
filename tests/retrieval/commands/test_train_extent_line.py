"""`casebase train` says when the lesion-extent head is on, and how to turn it off."""

from __future__ import annotations

from retrieval.cli import main


def test_train_reports_the_extent_head(phantom_dir, tmp_path, capsys):
    args = ["train", str(phantom_dir / "manifest.csv"), "--epochs", "1", "--width", "4"]
    assert main([*args, "--out", str(tmp_path / "on")]) == 0
    assert "lesion-extent head taught by" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "off"), "--extent-weight", "0"]) == 0
    assert "lesion-extent head" not in capsys.readouterr().out
