"""The app on volumes, headless (streamlit.testing): a tiny 3-D phantom indexed with a volume
model (cnn3d) and with a 2-D model (which reads each volume's middle axial slice).

The query and every neighbour get a slice scroller; the card's jump button moves its two
sliders to the matched region's slice; a typed box with its slices is searched and drawn on
the query's slices; a 2-D model's maps are said to be of the middle slice.
The fixtures are shared with the browser test (test_app_volume_browser.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from retrieval.app import volume_region as vr  # noqa: E402
from retrieval.app import volume_view as vv  # noqa: E402

from .test_app_unit import APP, TIMEOUT, _texts  # noqa: E402

TRAIN = ["--epochs", "1", "--width", "4"]


@pytest.fixture(scope="session")
def volume_phantom(tmp_path_factory, _casebase_home) -> Path:
    """`casebase phantom OUT --dim 3 --n 24 --size 32 --depth 8` (read-only)."""
    from retrieval.cli import main

    out = tmp_path_factory.mktemp("phantom3d")
    argv = ["phantom", str(out), "--dim", "3", "--n", "24", "--size", "32", "--depth", "8"]
    assert main(argv) == 0
    return out


def _index(root: Path, manifest: Path, backbone: str) -> Path:
    from retrieval.cli import main

    argv = ["train", str(manifest), "--out", str(root / "m"), *TRAIN, "--backbone", backbone]
    assert main(argv) == 0
    assert main(["index", "build", str(root / "m"), str(manifest), "--out", str(root / "i")]) == 0
    return root / "i"


@pytest.fixture(scope="session")
def volume_index(tmp_path_factory, volume_phantom) -> Path:
    """A 1-epoch cnn3d model on the 3-D phantom and its index (read-only)."""
    root = tmp_path_factory.mktemp("vol_index")
    return _index(root, volume_phantom / "manifest.csv", "cnn3d")


@pytest.fixture(scope="session")
def flat_volume_index(tmp_path_factory, volume_phantom) -> Path:
    """A 2-D (compact) model on the same volumes: it reads their middle axial slices."""
    root = tmp_path_factory.mktemp("flat_vol_index")
    return _index(root, volume_phantom / "manifest.csv", "compact")


def _run(monkeypatch, index: Path, manifest: Path) -> AppTest:
    monkeypatch.setenv("CASEBASE_INDEX", str(index))
    monkeypatch.setenv("CASEBASE_MANIFEST", str(manifest))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    next(b for b in at.button if b.label == "Run query").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _boxes(at: AppTest) -> tuple[list[int], list[int]]:
    """The first card's green (query box, case box), from its region caption (which shows
    inclusive ranges: the box's ends are the last index + 1)."""
    text = next(str(c.value) for c in at.caption if str(c.value).startswith("region 1:"))
    out = []
    for side in ("query", "case"):
        m = re.search(side + r" x (\d+)–(\d+), y (\d+)–(\d+)(?:, z (\d+)–(\d+))?", text)
        x0, x1, y0, y1, z0, z1 = m.groups()
        if z0 is None:
            out.append([int(x0), int(y0), int(x1) + 1, int(y1) + 1])
        else:
            out.append([int(x0), int(y0), int(z0), int(x1) + 1, int(y1) + 1, int(z1) + 1])
    return out[0], out[1]


def test_volume_model_scrollers_and_jump(monkeypatch, volume_index, volume_phantom):
    at = _run(monkeypatch, volume_index, volume_phantom / "manifest.csv")
    text = _texts(at)
    assert "Nearest cases" in text and "voxels" in text and "z 4 of 0–7" in text
    assert "model is 2-D" not in text  # a 3-D model's maps are of the whole volume
    keys = {s.key for s in at.slider}
    assert {"vv_preview_axial", "vv_maps_axial", "region_slices"} <= keys  # a box can be drawn
    assert at.slider(key="region_slices").value == vr.slices_around(4, 8)  # around the slice
    assert {f"vv_nb{i}_{p}_axial" for i in range(1, 6) for p in ("query", "case")} <= keys
    # volume models list the methods that run on volumes
    options = set(at.sidebar.multiselect[0].options)
    from retrieval.explain.registry import METHODS

    assert options <= set(METHODS)  # every method runs on a volume (LIME: supervoxels)
    assert {"gradcam", "similarity", "occlusion", "lime", "kernel_shap"} <= options
    box, case_box = _boxes(at)
    assert len(box) == 6 and len(case_box) == 6
    # the card's plane goes coronal, then the jump lands on the box's centre row
    at.radio(key="vv_nb1_query_plane").set_value("coronal").run()
    at.button(key="jump_1").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.slider(key="vv_nb1_query_coronal").value == vv.jump_index(box, "coronal", (8, 32, 32))
    assert at.slider(key="vv_nb1_case_axial").value == vv.jump_index(case_box, "axial", (8, 32, 32))
    # another panel keeps its own slice
    assert at.slider(key="vv_nb2_query_axial").value == 4


def test_2d_model_on_volumes_says_its_maps_are_of_the_middle_slice(
    monkeypatch, flat_volume_index, volume_phantom
):
    at = _run(monkeypatch, flat_volume_index, volume_phantom / "manifest.csv")
    text = _texts(at)
    assert "model is 2-D: it read the volume's middle axial slice (z 4)" in text, text
    assert "needs a 3-D model" in text and "region_slices" not in {s.key for s in at.slider}
    assert "vv_maps_axial" in {s.key for s in at.slider}
    box, _ = _boxes(at)
    assert len(box) == 4  # a 2-D box, on the middle slice
    at.slider(key="vv_nb1_query_axial").set_value(0).run()
    at.button(key="jump_1").click().run()
    assert at.slider(key="vv_nb1_query_axial").value == 4


def test_volume_region_typed_then_its_slices_moved_is_searched(
    monkeypatch, volume_index, volume_phantom
):
    at = _run(monkeypatch, volume_index, volume_phantom / "manifest.csv")
    box_input = at.text_input(key="region_text")
    box_input.set_value("20,20,4,4,4,6").run()  # inverted: said on the page, not searched
    assert "X0 < X1, Y0 < Y1 and Z0 < Z1" in _texts(at)
    assert at.button(key="search_region").disabled
    at.text_input(key="region_text").set_value("4,4,2,20,20,6").run()
    assert at.slider(key="region_slices").value == (2, 5)  # the slider follows the text
    at.slider(key="region_slices").set_value((3, 6)).run()  # and the text the slider
    assert at.text_input(key="region_text").value == "4,4,3,20,20,7"
    at.button(key="search_region").click().run()
    assert not at.exception, [e.value for e in at.exception]
    text = _texts(at)
    assert "Searched with the region x 4–19, y 4–19, z 3–6 (blue)" in text, text[-2000:]
    assert "The query failed" not in text
    trail = next(str(m.value) for m in at.markdown if str(m.value).startswith("Search trail"))
    assert trail.endswith("whole volume → **region x 4–19, y 4–19, z 3–6**"), trail
    # the axial slice shown (z 2) misses the box: a button moves it there
    at.slider(key="vv_preview_axial").set_value(2).run()
    at.button(key="region_jump").click().run()
    assert at.slider(key="vv_preview_axial").value == vv.jump_index(
        [4, 4, 3, 20, 20, 7], "axial", (8, 32, 32)
    )
    # on the other planes the box is shown, drawn on the axial one
    at.radio(key="vv_preview_plane").set_value("coronal").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "draw a box on the axial plane" in _texts(at)
