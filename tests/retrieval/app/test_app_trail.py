"""The app's refinement trail and box picking, without Streamlit running (retrieval.app.trail,
retrieval.app.refine)."""

from __future__ import annotations

import pytest

from retrieval.app.refine import check_box, drag_to_box, parse_box
from retrieval.app.trail import Refinement, Trail, box_text
from retrieval.errors import CasebaseError


def test_trail_labels_undo_and_reset_keep_each_steps_answer():
    t = Trail()
    t.push(Refinement(), "A")
    t.push(Refinement().with_region((10, 12, 40, 44)), "B")
    t.push(t.refinement.with_feedback(["c1"], ["c2"]), "C")
    assert t.labels() == [
        "whole image",
        "region x 10–39, y 12–43",  # inclusive ranges: the box ends at 40
        "+like c1 · −unlike c2",
    ]
    assert t.refinement.query_kwargs() == {
        "region": (10.0, 12.0, 40.0, 44.0),
        "like": ["c1"],
        "unlike": ["c2"],
    }
    uids = [s.uid for s in t.steps]
    assert t.undo() and t.current.result == "B" and t.refinement.like == ()
    t.push(t.refinement.with_region(None), "D")  # back to the whole image, feedback kept
    assert t.labels()[-1] == "whole image"
    assert t.current.uid not in uids  # a new step's 👍 / 👎 start unmarked
    assert t.reset() and [s.result for s in t.steps] == ["A"]
    assert not t.undo() and not t.reset()  # the first step stays


def test_feedback_accumulates_and_a_case_can_change_sides():
    r = Refinement().with_feedback(["a", "b"], ["c"])
    r = r.with_feedback(["c"], ["a"])
    assert r.like == ("b", "c") and r.unlike == ("a",)
    assert Refinement().query_kwargs() == {}


def test_drag_maps_display_pixels_to_the_image_and_clamps():
    # 240-px display of a 64-px image; the release lies outside the image (up-left of it)
    v = {"x1": 120, "y1": 60, "x2": -30, "y2": 300, "width": 240, "height": 240}
    assert drag_to_box(v, (64, 64)) == (0, 16, 32, 64)
    # a click without a drag is no box
    assert drag_to_box({**v, "x2": 120, "y2": 60}, (64, 64)) is None
    # a non-square image: each axis has its own scale
    v = {"x1": 24, "y1": 12, "x2": 48, "y2": 36, "width": 240, "height": 120}
    assert drag_to_box(v, (100, 200)) == (20, 10, 40, 30)


def test_parse_box():
    assert parse_box(" 1, 2.4 ,30,40.6") == (1, 2, 30, 41)
    with pytest.raises(CasebaseError, match="X0,Y0,X1,Y1"):
        parse_box("1,2,3")
    assert parse_box("1,2,3,40,50,6") == (1, 2, 3, 40, 50, 6)  # a volume's box


def test_check_box_reads_an_image_or_a_volume_box():
    assert check_box("  ") == (None, "")
    assert check_box("1,2,30,40") == ((1, 2, 30, 40), "")
    assert check_box("1,2,3,30,40,6", 3) == ((1, 2, 3, 30, 40, 6), "")
    box, problem = check_box("1,2,3,30,40,6")  # six numbers for an image
    assert box is None and "use X0,Y0,X1,Y1" in problem
    box, problem = check_box("1,2,30,40", 3)  # four for a volume
    assert box is None and "use X0,Y0,Z0,X1,Y1,Z1" in problem
    box, problem = check_box("40,40,10,10")
    assert box is None and problem.endswith("inverted box: X0 < X1 and Y0 < Y1")
    box, problem = check_box("1,2,6,30,40,6", 3)  # no slice
    assert box is None and problem.endswith("X0 < X1, Y0 < Y1 and Z0 < Z1")


def test_a_volume_region_in_the_trail():
    t = Trail(whole="whole volume")
    t.push(Refinement().with_region((1, 2, 3, 30, 40, 6)), "A")
    t.push(t.refinement.with_region(None), "B")
    assert t.labels() == ["region x 1–29, y 2–39, z 3–5", "whole volume"]
    assert t.undo() and t.refinement.query_kwargs() == {"region": (1.0, 2.0, 3.0, 30.0, 40.0, 6.0)}
    assert box_text((10, 12, 40, 44)) == "x 10–39, y 12–43"
