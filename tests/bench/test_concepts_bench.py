"""bench/concepts.py's layer rule and bench.report's concepts block, on small made-up JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import concepts as bench_concepts  # noqa: E402


def _tcav(effects: dict, passing: dict) -> dict:
    out = {}
    for ph, per_layer in effects.items():
        out[ph] = {
            "layers_tested": list(per_layer),
            "concepts": {
                "art": {
                    "layers": {
                        layer: {"classes": {c: {"effect": e} for c, e in eff.items()}}
                        for layer, eff in per_layer.items()
                    }
                }
            },
            "acceptance": {layer: {"all_pass": passing[ph][layer]} for layer in per_layer},
        }
    return out


def test_layer_rule_most_phantoms_then_agreement_with_pasting():
    use = {
        "a": {"artefact": "art", "classes": {"x": {"delta_centred_logit": 2.0},
                                             "y": {"delta_centred_logit": -1.0}}},
        "b": {"artefact": "art", "classes": {"x": {"delta_centred_logit": 0.5},
                                             "y": {"delta_centred_logit": -0.5}}},
    }  # fmt: skip
    effects = {
        "a": {"L1": {"x": 1.0, "y": -0.4}, "L2": {"x": -0.5, "y": 0.2}, "L3": {"x": 1, "y": 1}},
        "b": {"L1": {"x": 0.3, "y": -0.2}, "L2": {"x": 0.1, "y": 0.1}, "L3": {"x": 1, "y": 1}},
    }
    passing = {
        "a": {"L1": True, "L2": True, "L3": True},
        "b": {"L1": True, "L2": True, "L3": False},
    }
    out = bench_concepts.layer_choice(_tcav(effects, passing), use)
    assert out["L1"]["phantoms_passing"] == ["a", "b"] and out["L1"]["sign_agreement"] == "4/4"
    assert out["L2"]["effect_vs_pasting_r"] < 0 < out["L1"]["effect_vs_pasting_r"]
    assert out["chosen"] == "L1"  # L1 and L2 pass both; L1 agrees with pasting, L2 does not
    passing["b"]["L1"] = False
    assert bench_concepts.layer_choice(_tcav(effects, passing), use)["chosen"] == "L2"


def test_concepts_block_shows_failed_checks_and_significance(tmp_path):
    src = json.loads((ROOT / "bench" / "results" / "concepts.json").read_text())
    phs = [k for k, v in src["tcav"].items() if isinstance(v, dict) and "acceptance" in v]
    for ph in phs:  # every check passes but the first phantom's first one
        v = src["tcav"][ph]
        checks = v["acceptance"][v["layer"]]["checks"]
        for i, text in enumerate(checks):
            checks[text] = not (ph == phs[0] and i == 0)
        for c in v["concepts"].values():
            for t in c["classes"].values():
                t["significant"] = False
    name, conc = next(iter(src["tcav"][phs[0]]["concepts"].items()))
    cls = next(iter(conc["classes"]))
    conc["classes"][cls]["significant"] = True
    results = tmp_path / "results"
    results.mkdir()
    (results / "concepts.json").write_text(json.dumps(src))
    block = report._concepts(results)
    lines = block.splitlines()
    fails = [line for line in lines if "**FAIL**" in line]
    assert len(fails) == 1 and fails[0].startswith(f"| {phs[0]} |")
    yes = [line for line in lines if "**yes**" in line]
    assert len(yes) == 1 and yes[0].startswith(f"| {phs[0]} | `{name}` | {cls} |")


def test_acceptance_needs_the_tied_class_above_half_and_controls_silent():
    tests = {
        ("marker", "nodule"): {"tcav_score": 0.9},
        ("marker", "mass"): {"tcav_score": 0.4},
        ("control", "nodule"): {"tcav_score": 0.6},
        ("control", "mass"): {"tcav_score": 0.5},
    }
    sig = {k: False for k in tests} | {("marker", "nodule"): True}
    got = bench_concepts._acceptance(["marker", "control"], sig, tests, "nodule")
    assert got["all_pass"] and got["significant"] == ["marker/nodule"]
    # the tied class significant but with TCAV <= 0.5: fails
    low = tests | {("marker", "nodule"): {"tcav_score": 0.5}}
    assert not bench_concepts._acceptance(["marker", "control"], sig, low, "nodule")["all_pass"]
    # a control significant for any class: fails; with no tie every concept must be silent
    loud = sig | {("control", "mass"): True}
    assert not bench_concepts._acceptance(["marker", "control"], loud, tests, "nodule")["all_pass"]
    assert not bench_concepts._acceptance(["marker", "control"], sig, tests, None)["all_pass"]


def test_layer_acceptance_per_layer_and_statistic():
    """part_tcav's rule over a run_concepts JSON: the library's decision per layer, or Holm
    over one statistic's raw p-values (this once crashed: two functions shared the name)."""

    def t(sig, score, p_effect, p_score):
        return {"significant": sig, "tcav_score": score, "p_value_effect": p_effect,
                "p_value_score": p_score}  # fmt: skip

    data = {
        "layers_tested": ["L1", "L2"],
        "concepts": {
            "ruler": {"layers": {
                "L1": {"classes": {"melanoma": t(True, 0.8, 0.001, 0.4), "naevus": t(False, 0.3, 0.5, 0.5)}},
                "L2": {"classes": {"melanoma": t(False, 0.6, 0.2, 0.001), "naevus": t(False, 0.4, 0.9, 0.9)}},
            }},
            "control_ru": {"layers": {
                "L1": {"classes": {"melanoma": t(False, 0.5, 0.6, 0.6), "naevus": t(False, 0.5, 0.7, 0.7)}},
                "L2": {"classes": {"melanoma": t(False, 0.5, 0.6, 0.6), "naevus": t(False, 0.5, 0.7, 0.7)}},
            }},
        },
    }  # fmt: skip
    names = ["ruler", "control_ru"]
    lib = bench_concepts._layer_acceptance("ru", data, names)
    assert lib["L1"]["all_pass"] and not lib["L2"]["all_pass"]
    by_score = bench_concepts._layer_acceptance("ru", data, names, "score")
    assert by_score["L2"]["all_pass"] and not by_score["L1"]["all_pass"]
    assert bench_concepts._layer_acceptance("ru", data, names, "effect")["L1"]["all_pass"]
