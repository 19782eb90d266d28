"""Is it the cut-offs or the sample that limits the audit's power on 45 queries?

bench/audit_heldout.py scored the frozen flag rule on held-out photo phantoms: power where the
model uses its confounder 40/45 on 300-case phantoms (45 test queries each), 21/21 on
600-case phantoms (90 queries). This script re-decides those stored runs (no audit or training
is re-run: ``rejudge`` applies the current rule to each run's stored statistics) under a grid
of the two cut-offs a looser rule could move: the concordance level (``ALPHA``, frozen at
0.01) and the probe floor (``MIN_PROBE_MARGIN``, frozen at 0.10). For each cell it records
power where used, flags where the model ignores its confounder, and false flags (the hard
case + clean runs), and whether the cell meets the goal: power >= 0.95 with both kinds of
wrong flag <= 5 %. The runs the loosest cell still misses are listed with the gate that stops
each. Nothing here changes the rule: it says what a change could buy, on runs the cut-offs
were already scored on, so a cell that "meets the goal" here would still need fresh seeds.

    .venv/bin/python bench/audit_levels.py      # reads bench/results/audit_heldout*.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import RESULTS, finish, machine, rejudge
from audit_heldout import CONDITIONS, summarize

ALPHAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
MARGINS = (0.10, 0.05, 0.03, 0.0)
GOAL_POWER, GOAL_WRONG = 0.95, 0.05
# Which stored sweeps make one sample size: the 300-case sets are pooled (seeds 0-19).
SETS = {
    "300": ("audit_heldout", "audit_heldout_validation"),
    "600": ("audit_heldout_600",),
}


def n_test_queries(n_cases: int) -> int:
    """Test-split size of an n-case phantom (retrieval.data.phantom's split plan)."""
    from retrieval.data.phantom import _split_sizes

    return _split_sizes(n_cases)["test"]


def cell(runs: list[dict], alpha: float, margin: float) -> dict:
    """One grid cell: the three rates under (alpha, margin) and whether the goal is met."""
    s = summarize(rejudge(runs, alpha, margin))
    out = {k: s[k] for k in ("power_where_used", "flagged_where_ignored", "false_flags")}
    rates = [out[k]["rate"] for k in out]
    out["meets_goal"] = (
        None
        if None in rates
        else bool(rates[0] >= GOAL_POWER and rates[1] <= GOAL_WRONG and rates[2] <= GOAL_WRONG)
    )
    return {"alpha": alpha, "min_probe_margin": margin, **out}


def misses(runs: list[dict], alpha: float, margin: float) -> list[dict]:
    """Used-but-unflagged runs under (alpha, margin), each with the gates it fails."""
    from retrieval.audit import verdict

    out = []
    for r in rejudge(runs, alpha, margin):
        attr = CONDITIONS[r["condition"]][1]
        v = r["attributes"][attr]
        if not r.get("used") or v["flagged"]:
            continue
        conc = any(
            p is not None and p < alpha and lift is not None and lift >= verdict.MIN_LIFT
            for p, lift in (
                (v["p_value_holm"], v["lift"]),
                (v["p_value_holm_query"], v["lift_query"]),
            )
        )
        pa, ch = v["probe_balanced_accuracy"], v["chance"]
        probe = None if pa is None or ch is None else pa - ch
        va, vp = v["label_association"], v["label_association_p"]
        assoc = (
            va is not None
            and vp is not None
            and vp < verdict.ASSOC_ALPHA
            and va >= verdict.MIN_ASSOCIATION
        )
        gates = [g for g, ok in (("concordance", conc), ("association", assoc)) if not ok]
        if probe is not None and probe < margin:
            gates.insert(1, "probe")
        out.append(
            {
                "condition": r["condition"],
                "seed": r["seed"],
                "pull": r["intervention"]["pull"],
                "probe_margin": probe,
                "p_value_holm": v["p_value_holm"],
                "p_value_holm_query": v["p_value_holm_query"],
                "fails": gates,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of the held-out JSON")
    args = ap.parse_args()
    started, info = time.time(), machine()
    sets = {}
    for name, files in SETS.items():
        paths = [Path(args.results) / f"{f}.json" for f in files]
        if not all(p.is_file() for p in paths):
            print(f"skipping the {name}-case set: {', '.join(str(p) for p in paths)} missing")
            continue
        docs = [json.loads(p.read_text()) for p in paths]
        runs = [r for d in docs for r in d["runs"]]
        n_cases = docs[0]["args"]["n"]
        grid = [cell(runs, a, m) for m in MARGINS for a in ALPHAS]
        loosest = (max(ALPHAS), min(MARGINS))
        sets[name] = {
            "sources": [f"{f}.json" for f in files],
            "seeds": [d["args"]["seeds"] for d in docs],
            "n_cases": n_cases,
            "test_queries": n_test_queries(n_cases),
            "runs": len(runs),
            "frozen": cell(runs, 0.01, 0.10),
            "grid": grid,
            "any_cell_meets_goal": any(c["meets_goal"] for c in grid),
            "best_power": max(c["power_where_used"]["rate"] for c in grid),
            "misses_at_loosest": {
                "alpha": loosest[0],
                "min_probe_margin": loosest[1],
                "runs": misses(runs, *loosest),
            },
            "misses_at_frozen": misses(runs, 0.01, 0.10),
        }
        s = sets[name]
        print(
            f"{name} cases ({s['test_queries']} test queries, {s['runs']} runs): frozen power "
            f"{s['frozen']['power_where_used']['k']}/{s['frozen']['power_where_used']['n']}; "
            f"best over the grid {s['best_power']:.3f}; any cell meets the goal: "
            f"{s['any_cell_meets_goal']}"
        )
        for c in grid:
            pw, ig, ff = c["power_where_used"], c["flagged_where_ignored"], c["false_flags"]
            print(
                f"  alpha {c['alpha']:<6} margin {c['min_probe_margin']:<5} used {pw['k']}/{pw['n']}"
                f"  ignored {ig['k']}/{ig['n']}  false {ff['k']}/{ff['n']}  goal {c['meets_goal']}"
            )
    payload = {
        "args": {"alphas": list(ALPHAS), "margins": list(MARGINS)},
        "goal": {"power_where_used": GOAL_POWER, "wrong_flags": GOAL_WRONG},
        "sets": sets,
    }
    finish("audit_levels", info, payload, started)


if __name__ == "__main__":
    main()
