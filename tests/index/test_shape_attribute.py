"""The original image size as an audit attribute: added where the images differ in it."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from index.builder import add_shape_attribute, build_index


def _cases(n):
    return pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "label": ["a"] * n})


def test_shape_added_only_where_sizes_differ():
    assert "image_shape" not in add_shape_attribute(_cases(3), [[64, 64]] * 3)
    out = add_shape_attribute(_cases(3), [[64, 64], [64, 80], [64, 64]])
    assert out["image_shape"].tolist() == ["64x64", "64x80", "64x64"]
    many = [[64 + i, 64] for i in range(12)]  # more shapes than groups: the pixel count
    out = add_shape_attribute(_cases(12), many)
    assert "image_shape" not in out and out["image_pixels"].iloc[1] == str(65 * 64)
    # a column that already says it (ingest-dicom's rows / columns) is left alone
    dicom = _cases(3).assign(rows=["64", "80", "64"])
    assert list(add_shape_attribute(dicom, [[64, 64], [80, 64], [64, 64]]).columns) == list(
        dicom.columns
    )
    # queries get what the index has, even where their own sizes agree
    q = add_shape_attribute(_cases(2), [[64, 64]] * 2, like=["site", "image_shape"])
    assert q["image_shape"].tolist() == ["64x64", "64x64"]
    assert "image_shape" not in add_shape_attribute(_cases(2), [[64, 80]] * 2, like=["site"])


def test_index_and_audit_queries_carry_the_shape(tiny_index, tmp_path):
    from retrieval import CaseRetriever
    from retrieval.service.evaluate import embed_split

    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        side = (48, 48) if i % 2 else (64, 40)
        Image.fromarray(rng.integers(0, 255, side, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        split = "test" if i >= 12 else "train"
        rows.append({"case_id": f"c{i}", "image": f"{i}.png", "label": "ab"[i % 2], "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    build_index(tiny_index / "model", tmp_path / "m.csv", tmp_path / "idx", progress=False)
    r = CaseRetriever.load(tmp_path / "idx")
    assert "image_shape" in r.attribute_names
    assert set(r.cases["image_shape"]) == {"48x48", "64x40"}
    qs = embed_split(r, tmp_path / "m.csv", "test", 3, progress=False)
    assert qs.cases["image_shape"].tolist() == ["64x40", "48x48", "64x40", "48x48"]
