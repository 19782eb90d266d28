"""The map panel's grouping and verdict line (no browser)."""

from retrieval.app import maps
from retrieval.explain.methods import FAMILIES


def test_grouped_follows_the_family_order_and_drops_empty_families():
    got = maps.grouped(["lrp", "gradient", "gradcam", "kernel_shap", "deeplift"])
    assert got == [
        ("CAM family", ["gradcam"]),
        ("gradients", ["gradient", "deeplift"]),
        ("Shapley", ["kernel_shap"]),
        ("relevance", ["lrp"]),
    ]
    every = [m for names in FAMILIES.values() for m in names]
    assert [m for _, names in maps.grouped(every) for m in names] == every
    assert maps.grouped(["not_a_method"]) == [("other", ["not_a_method"])]


def test_verdict_line_states_sanity_faithfulness_and_cases():
    t = {"sanity_check": "fail", "faithfulness": "not faithful on this data", "n_cases": 12}
    assert maps.verdict_line(t) == "sanity FAIL · not faithful on this data · 12 cases"
    assert maps.verdict_line({"sanity_check": "not run"}) == ""


def test_sanity_curves_are_drawn_only_for_a_method_that_carries_them():
    from retrieval.explain import sanity

    blocks = ["head", "features.5", "features.4"]
    curve = {m: [0.9, 0.4, 0.1] for m in sanity.METRICS}
    t = {
        "sanity_check": "pass",
        "sanity": {
            "blocks": blocks,
            "cascading": curve,
            "independent": curve,
            "threshold_abs_spearman": 0.5,
            "verdict": "pass",
        },
    }
    assert sanity.has_curves(t)
    assert not sanity.has_curves({"sanity_check": "pass"})
    assert not sanity.has_curves({"sanity": {"blocks": [], "cascading": {}, "independent": {}}})
    fig = sanity.curves_figure({"gradcam": t, "unmeasured": {"sanity_check": "not run"}})
    drawn = [ax for ax in fig.axes if ax.lines]
    assert len(drawn) == 1  # one panel: the method without curves is left out
    # original + 3 blocks per line; 4 metrics x (cascading, independent) + the threshold
    assert len(drawn[0].lines) == 2 * len(sanity.METRICS) + 1
    assert all(len(line.get_xdata()) == len(blocks) + 1 for line in drawn[0].lines[:-1])


def test_a_flat_map_says_so_and_a_map_with_a_peak_does_not():
    import numpy as np

    assert "Flat map" in maps.flat_note(np.zeros((8, 8)))
    assert "Flat map" in maps.flat_note(np.full((2, 8, 8), 0.3))  # a volume's map too
    peak = np.zeros((2, 8, 8))
    peak[1, 4, 4] = 1.0
    peak[1, 3:6, 3:6] += 0.5
    assert maps.flat_note(peak) == ""
