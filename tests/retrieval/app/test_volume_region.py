"""Drawing a region on a volume query, without Streamlit running (retrieval.app.volume_region)."""

from __future__ import annotations

from retrieval.app import volume_region as vr

SHAPE = (8, 32, 64)  # (D, H, W)


def test_slices_around_stay_inside_the_volume():
    assert vr.slices_around(4, 8) == (4 - vr.HALF, 4 + vr.HALF)
    assert vr.slices_around(0, 8, half=2) == (0, 2)
    assert vr.slices_around(7, 8, half=2) == (5, 7)
    assert vr.slices_around(12, 8, half=1) == (6, 7)  # a slice past the end: the last one
    assert vr.slices_around(0, 1) == (0, 0)


def test_volume_box_ends_exclusive_and_back_to_the_slider():
    box = vr.volume_box((3, 4, 20, 30), (2, 5))
    assert box == (3, 4, 2, 20, 30, 6)  # slices 2..5 inclusive: z 2–6, as the service takes it
    assert vr.volume_box((3, 4, 20, 30), (5, 2)) == box  # either thumb first
    assert vr.box_slices(box, 8) == (2, 5)
    assert vr.volume_box((0, 0, 1, 1), (3, 3))[2::3] == (3, 4)  # one slice
    # a typed box running past the volume: the slider shows what lies inside
    assert vr.box_slices((0, 0, -3, 5, 5, 20), 8) == (0, 7)
    assert vr.box_slices((0, 0, 9, 5, 5, 12), 8) == (7, 7)
    assert vr.with_slices(box, (0, 7)) == (3, 4, 0, 20, 30, 8)


def test_drag_on_an_axial_slice_to_voxels_clamped():
    # a 240 × 120 display of a 64 × 32 slice; the release lies past the right edge
    drag = {"x1": 30, "y1": 15, "x2": 300, "y2": 60, "width": 240, "height": 120}
    assert vr.drawn_box(drag, SHAPE, (3, 5), 4) == (8, 4, 3, 64, 16, 6)
    # drawn on a slice outside the chosen range: the slices around the slice drawn on
    assert vr.drawn_box(drag, SHAPE, (0, 1), 6) == (8, 4, 4, 64, 16, 8)
    assert vr.drawn_box(drag, SHAPE, (0, 1), 7) == (8, 4, 5, 64, 16, 8)
    # a click without a drag is no box
    assert vr.drawn_box({**drag, "x2": 30, "y2": 15}, SHAPE, (3, 5), 4) is None
