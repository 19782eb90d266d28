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
