"""Human-readable box ranges are inclusive (first–last index) for x, y and slices alike; the
boxes themselves (JSON) stay end-exclusive."""

from __future__ import annotations

import numpy as np
import pandas as pd

from retrieval.service.results import box_ranges


def test_box_ranges_are_inclusive_on_every_axis():
    assert box_ranges([5, 2, 37, 10]) == "x 5–36, y 2–9"
    assert box_ranges((1, 2, 0, 30, 40, 28)) == "x 1–29, y 2–39, z 0–27"
    assert box_ranges((4.0, 4.0, 3.0, 20.0, 20.0, 7.0)) == "x 4–19, y 4–19, z 3–6"
    assert box_ranges([0, 0, 1, 1]) == "x 0–0, y 0–0"  # one pixel


def test_the_explanation_text_quotes_the_region_inclusively_and_json_keeps_the_box(
    tiny_index, phantom_dir
):
    from retrieval.service.retriever import CaseRetriever

    df = pd.read_csv(phantom_dir / "manifest.csv")
    image = str(phantom_dir / df[df["split"] == "test"].iloc[0]["image"])
    res = CaseRetriever.load(tiny_index).query(image, k=5)
    tops = [n.matched_regions[0].query_box for n in res.neighbors if n.matched_regions]
    assert tops
    b = np.median(np.array(tops), axis=0).astype(int).tolist()
    assert f"region at x {b[0]}–{b[2] - 1}, y {b[1]}–{b[3] - 1} " in res.explanation_text
    js = res.to_json()
    box = js["neighbors"][0]["matched_regions"][0]["query_box"]
    assert len(box) == 4 and box[2] > box[0] and box[3] > box[1]  # end-exclusive, unchanged
