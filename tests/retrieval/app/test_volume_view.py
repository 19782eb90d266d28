"""The slice scroller's pure helpers (retrieval/app/volume_view.py): planes, aspect, the slice a
box jumps to, a box's rectangle on a slice (boxes outside and at the edges), rendering."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.app import volume_view as vv

SHAPE = (4, 5, 6)  # D, H, W


def _vol() -> np.ndarray:
    return np.arange(np.prod(SHAPE)).reshape(SHAPE)


def test_planes_cut_the_right_axis_with_the_highest_slice_on_top():
    v = _vol()
    assert np.array_equal(vv.plane_slice(v, "axial", 2), v[2])
    cor = vv.plane_slice(v, "coronal", 3)
    assert cor.shape == (4, 6) and np.array_equal(cor, v[::-1, 3, :])
    assert np.array_equal(cor[0], v[3, 3, :])  # top row: the last slice
    sag = vv.plane_slice(v, "sagittal", 1)
    assert sag.shape == (4, 5) and np.array_equal(sag, v[::-1, :, 1])
    # out of range: clipped inside
    assert np.array_equal(vv.plane_slice(v, "axial", 99), v[3])
    assert np.array_equal(vv.plane_slice(v, "axial", -5), v[0])
    assert [vv.n_slices(SHAPE, p) for p in vv.PLANES] == [4, 5, 6]
    assert vv.middle(SHAPE) == 2
    with pytest.raises(ValueError):
        vv.plane_slice(v, "oblique", 0)
    with pytest.raises(ValueError):
        vv.plane_slice(v[0], "axial", 0)


def test_aspect_from_the_spacing():
    sp = (7.5, 5.0, 2.5)  # z, y, x mm
    assert vv.aspect(sp, "axial") == 2.0  # rows y / columns x
    assert vv.aspect(sp, "coronal") == 3.0  # rows z / columns x
    assert vv.aspect(sp, "sagittal") == 1.5  # rows z / columns y
    assert vv.aspect(None, "coronal") == 1.0
    assert vv.aspect((0.0, 1.0, 1.0), "coronal") == 1.0  # nonsense spacing: square voxels
    # a (4, 6) coronal slice 240 px wide: 40 px a column, 40 * 3 = 120 a row
    assert vv.display_size((4, 6), sp, "coronal", 240) == (480, 240)
    assert vv.display_size((4, 6), None, "coronal", 240) == (160, 240)


def test_jump_index_is_the_box_centre_clipped_inside():
    box = [1, 0, 0, 3, 5, 4]  # x 1-3, y 0-5, z 0-4
    assert vv.jump_index(box, "axial", SHAPE) == 1  # z 0..3: lower middle
    assert vv.jump_index(box, "coronal", SHAPE) == 2  # y 0..4
    assert vv.jump_index(box, "sagittal", SHAPE) == 1  # x 1..2
    assert vv.jump_index([0, 0, 2, 1, 1, 3], "axial", SHAPE) == 2  # one slice thick
    assert vv.jump_index([0, 0, 3, 1, 1, 4], "axial", SHAPE) == 3  # the last slice
    # beyond the volume: clipped to the nearest slice
    assert vv.jump_index([0, 0, 7, 1, 1, 9], "axial", SHAPE) == 3
    assert vv.jump_index([-9, 0, 0, -2, 1, 1], "sagittal", SHAPE) == 0
    # a 2-D model's box lies on the middle axial slice
    assert vv.jump_index([1, 1, 3, 3], "axial", SHAPE) == 2
    assert vv.as_box3d([1, 1, 3, 3], SHAPE) == [1, 1, 2, 3, 3, 3]
    with pytest.raises(ValueError):
        vv.as_box3d([1, 2, 3], SHAPE)


def test_box_rect_on_each_plane():
    box = [1, 2, 1, 4, 5, 3]  # x 1-4, y 2-5, z 1-3 (ends exclusive)
    assert vv.box_rect(box, "axial", 1, SHAPE) == (1, 2, 4, 5)
    assert vv.box_rect(box, "axial", 2, SHAPE) == (1, 2, 4, 5)
    assert vv.box_rect(box, "axial", 0, SHAPE) is None  # below the box
    assert vv.box_rect(box, "axial", 3, SHAPE) is None  # z1 is exclusive
    # coronal: columns x, rows z flipped (D - z1 .. D - z0)
    assert vv.box_rect(box, "coronal", 2, SHAPE) == (1, 1, 4, 3)
    assert vv.box_rect(box, "coronal", 1, SHAPE) is None
    # sagittal: columns y, rows z flipped
    assert vv.box_rect(box, "sagittal", 3, SHAPE) == (2, 1, 5, 3)
    assert vv.box_rect(box, "sagittal", 4, SHAPE) is None
    # the rectangle lands on the same voxels as the cut
    v = np.zeros(SHAPE, bool)
    v[1:3, 2:5, 1:4] = True
    for plane in vv.PLANES:
        for i in range(vv.n_slices(SHAPE, plane)):
            cut = vv.plane_slice(v, plane, i)
            r = vv.box_rect(box, plane, i, SHAPE)
            if r is None:
                assert not cut.any()
            else:
                expect = np.zeros_like(cut)
                expect[r[1] : r[3], r[0] : r[2]] = True
                assert np.array_equal(cut, expect), (plane, i)


def test_box_rect_at_the_edges_and_outside():
    whole = [0, 0, 0, 6, 5, 4]
    assert vv.box_rect(whole, "axial", 0, SHAPE) == (0, 0, 6, 5)
    assert vv.box_rect(whole, "axial", 3, SHAPE) == (0, 0, 6, 5)
    assert vv.box_rect(whole, "coronal", 4, SHAPE) == (0, 0, 6, 4)
    # sticking out of the volume: clipped to the slice
    assert vv.box_rect([-3, -2, 0, 9, 9, 4], "axial", 0, SHAPE) == (0, 0, 6, 5)
    assert vv.box_rect([4, 0, -2, 9, 2, 2], "coronal", 1, SHAPE) == (4, 2, 6, 4)
    # wholly outside the slice's extent, or empty: nothing to draw
    assert vv.box_rect([6, 0, 0, 8, 2, 4], "axial", 0, SHAPE) is None
    assert vv.box_rect([2, 2, 0, 2, 4, 4], "axial", 0, SHAPE) is None
    # a 2-D box: on the middle axial slice only
    assert vv.box_rect([1, 1, 3, 3], "axial", 2, SHAPE) == (1, 1, 3, 3)
    assert vv.box_rect([1, 1, 3, 3], "axial", 1, SHAPE) is None
    assert vv.box_rect([1, 1, 3, 3], "coronal", 1, SHAPE) == (1, 1, 3, 2)


def test_heat_slice_3d_and_a_2d_models_map():
    heat = np.random.default_rng(0).random(SHAPE)
    assert np.array_equal(
        vv.heat_slice(heat, "sagittal", 2, SHAPE), vv.plane_slice(heat, "sagittal", 2)
    )
    flat = heat[2]
    assert np.array_equal(vv.heat_slice(flat, "axial", 2, SHAPE), flat)
    assert vv.heat_slice(flat, "axial", 1, SHAPE) is None
    assert vv.heat_slice(flat, "coronal", 2, SHAPE) is None
    assert vv.heat_slice(None, "axial", 2, SHAPE) is None


def test_render_slice_sizes_overlay_and_box_colours():
    arr = np.full(SHAPE, 0.5, np.float32)
    vol = vv.shown_volume(arr)
    assert vol.array.dtype == np.uint8 and vol.spacing is None and vol.shape == SHAPE
    plain = vv.render_slice(vol, "axial", 1, width=120)
    assert plain.shape == (100, 120, 3) and (plain == 128).all()
    heat = np.zeros(SHAPE, np.float32)
    heat[1, 2, 3] = 1.0
    hot = vv.render_slice(vol, "axial", 1, heat=heat, width=120)
    assert not np.array_equal(hot, plain)
    assert np.array_equal(vv.render_slice(vol, "axial", 0, heat=heat, width=120), plain)
    boxed = vv.render_slice(
        vol, "axial", 1, boxes=[[0, 0, 1, 6, 5, 2], [1, 1, 0, 2, 2, 4]], width=120
    )
    colours = {tuple(c) for c in boxed.reshape(-1, 3)}
    assert vv.FIRST in colours and vv.OTHERS in colours
    # the first box missed by this slice: the second keeps its own colour
    second_only = vv.render_slice(
        vol, "axial", 3, boxes=[[0, 0, 1, 6, 5, 2], [1, 1, 0, 2, 2, 4]], width=120
    )
    colours = {tuple(c) for c in second_only.reshape(-1, 3)}
    assert vv.OTHERS in colours and vv.FIRST not in colours
    # the searched region (blue) on the slices it spans, under the matched boxes
    region = [0, 0, 1, 6, 5, 3]
    for z, shown in ((0, False), (1, True), (2, True), (3, False)):
        cut = vv.render_slice(vol, "axial", z, width=120, region=region)
        assert (vv.REGION in {tuple(c) for c in cut.reshape(-1, 3)}) is shown, z
    on_top = vv.render_slice(vol, "axial", 1, boxes=[region], width=120, region=region)
    colours = {tuple(c) for c in on_top.reshape(-1, 3)}
    assert vv.FIRST in colours and vv.REGION not in colours


def test_shown_volume_spacing_only_when_known():
    from retrieval.data.volume import Volume

    a = np.zeros((3, 8, 8), np.float32)
    known = Volume(a, (2.0, 1.0, 1.0), a, (0.5, 1.0), meta={"spacing_known": True})
    unknown = Volume(a, (1.0, 1.0, 1.0), a, (0.5, 1.0), meta={"spacing_known": False})
    assert vv.shown_volume(known).spacing == (2.0, 1.0, 1.0)
    assert vv.shown_volume(unknown).spacing is None
    assert "7.5×5×5 mm" in vv.slice_caption(
        vv.ShownVolume(np.zeros(SHAPE, np.uint8), (7.5, 5, 5)), "axial", 1
    )
    assert "spacing unknown" in vv.slice_caption(vv.shown_volume(a), "coronal", 0)
