"""`casebase audit` on a volume index: the worst-example panels are drawn on a slice (they
stopped the audit with "expected an (H, W[, C]) image" before) and say which."""

from __future__ import annotations

import json
import re

import pytest

from retrieval.cli import main


@pytest.mark.slow
def test_audit_of_a_volume_index_draws_its_examples_on_a_labelled_slice(tmp_path, capsys):
    from retrieval.data.phantom3d import make_phantom3d

    make_phantom3d(tmp_path / "ph", n=30, size=32, depth=8, seed=3)
    manifest = tmp_path / "ph" / "manifest.csv"
    model, index, html = tmp_path / "m", tmp_path / "i", tmp_path / "audit.html"
    args = ["--epochs", "1", "--width", "4"]
    assert main(["train", str(manifest), "--out", str(model), *args]) == 0
    assert main(["index", "build", str(model), str(manifest), "--out", str(index)]) == 0
    capsys.readouterr()
    rc = main(
        ["audit", str(index), str(manifest), "--json", "--permutations", "20", "--out", str(html)]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert out["examples_attribute"] is not None  # there were panels to draw
    labels = re.findall(r"axial slice (\d+) of 0–7", html.read_text())
    assert labels and all(0 <= int(k) <= 7 for k in labels)
