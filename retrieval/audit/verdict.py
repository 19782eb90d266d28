"""The flag rule: when does the audit call an attribute a retrieval shortcut?

An attribute is **flagged** (a shortcut) when all of these hold:

1. its retrieval concordance exceeds a label-preserving null, by either test
   of ``concordance`` (index side: the attribute permuted among indexed cases
   of one label; query side: among queries of one label), with a
   Holm-corrected p < ``ALPHA`` (0.01). Each test is its own family, Holm-
   corrected over the audited attributes, so the concordance step alone has a
   family-wise error of at most 2 × 0.01 before gates 3 and 4 apply; and
2. a lift ≥ ``MIN_LIFT`` (1.05) in that test: a floor so that a negligible
   excess is never flagged however many queries make it "significant". It is
   deliberately low: for an attribute tied to the label the label-preserving
   nulls leave little room (a site that is 93 % one class per label can only
   gain on the other 7 %), so a real shortcut shows lifts of only 1.1-1.4;
3. within-label probe balanced accuracy ≥ chance + ``MIN_PROBE_MARGIN``
   (0.10): the embedding itself encodes the attribute beyond what the label
   explains. This is what keeps random attributes out: on 200 attributes
   random by construction (bench/audit_null.py, on a clean and a confounded
   1,200-case index) the largest margin was 0.051, and none was flagged.
   When the probe cannot be run (e.g. the attribute is constant within every
   label in the index) the rule falls back on 1 and 2 and says so;
4. the attribute is associated with the label among the indexed cases
   (chi-squared test p < ``ASSOC_ALPHA`` and Cramér's V ≥ ``MIN_ASSOCIATION``):
   a shortcut is a *spurious correlate of the label* the model can use as
   label evidence, as a site marker tied to a class is.

An attribute meeting 1–3 but not 4 is reported as **retrieval_bias**, not
flagged: neighbours do cluster by it (e.g. a scanner's noise and contrast
that the embedding keeps), but since it says nothing about the label in the
index it cannot be what the model relies on for the label; the per-group
precision shows whether it costs any group accuracy. An attribute so tied to
the label that the index cannot tell them apart (V ≥ 0.95) gets a note: the
index-side null then has nothing to permute.

How the thresholds were chosen, on phantoms where the truth is known
(bench/audit_seeds.py: a burned-in site marker tied to the label at strength
0.9, random sex and age, and a scanner whose noise and contrast the images
show but which is independent of the label; bench/audit_null.py: attributes
random by construction). The concordance p-values are calibrated (5 % of
random attributes below 0.05), so the p-value alone would false-flag at its
nominal rate and random lifts reach 1.15-1.18; the within-label probe is what
separates: random attributes ≤ 0.05 above chance, a used site marker 0.17-0.39.
A floor of 0.10 sits between. The lift floor is low (1.05) because the
label-preserving nulls cap a label-tied attribute's lift (1.06-1.32 for the
marker across seeds). Ground truth for "the model uses the marker" comes from
swapping the burned-in letter (how many neighbours change to the new letter's
site), which only a phantom allows.

Out of sample (bench/audit_heldout.py: RGB photo phantoms, 20 seeds per
condition in two sets of 10, cut-offs frozen, use of each confounder measured by re-rendering
the test images with it changed) the rule flagged 40 of the 45 runs whose model used its
confounder: a ruler or the camera device 39 of 40, a burned-in letter used weakly 1 of 5.
It flagged none of the 35 runs whose model ignored a letter, and nothing on clean runs or on a
label-tied column absent from the pixels (0 of 40). ALPHA 0.05 would have caught one more on
the first set and falsely flagged two ignored letters. On phantoms twice the size (600 cases,
about 90 test queries, seeds 20-29) the same rule flagged all 21 runs that used their
confounder and nothing else (0 of 39). Over the three sets, every use that moved >= 15 % of the
neighbours was flagged (52 of 52), weaker uses 9 of 14: a lift below the test's critical value
(``detectable_lift``, shown in the report) cannot be flagged. The report says so and that the
cut-offs were chosen on x-ray phantoms.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chi2 as chi2_dist

ALPHA = 0.01
MIN_LIFT = 1.05
MIN_PROBE_MARGIN = 0.10
ASSOC_ALPHA = 0.001
MIN_ASSOCIATION = 0.10
CONFOUNDED = 0.95

RULE = (
    f"flagged (shortcut) = concordance above a label-preserving null (index- or query-side "
    f"permutation test, Holm-corrected p < {ALPHA}, lift >= {MIN_LIFT}) AND "
    f"within-label probe balanced accuracy >= chance + {MIN_PROBE_MARGIN} AND the attribute is "
    f"associated with the label in the index (chi-squared p < {ASSOC_ALPHA}, Cramér's V >= "
    f"{MIN_ASSOCIATION}); the first three without the last = retrieval_bias"
)


def _concordant(p_holm: float | None, lift: float | None, alpha: float = ALPHA) -> bool:
    return p_holm is not None and p_holm < alpha and lift is not None and lift >= MIN_LIFT


def decide(
    p_holm: float | None,
    lift: float | None,
    probe_ba: float | None,
    chance: float | None,
    association: tuple[float | None, float | None] = (None, None),
    p_holm_query: float | None = None,
    lift_query: float | None = None,
    alpha: float = ALPHA,
    min_probe_margin: float = MIN_PROBE_MARGIN,
) -> tuple[bool, bool, list[str]]:
    """(flagged, retrieval_bias, reasons): each criterion as met / not met, in words. ``alpha``
    and ``min_probe_margin`` replace the concordance level and the probe floor only to compare
    cut-offs on stored runs (bench/audit_levels.py)."""
    reasons = []
    ci, cq = _concordant(p_holm, lift, alpha), _concordant(p_holm_query, lift_query, alpha)
    reasons.append(
        f"index-side null: p_holm {_f(p_holm)}, lift {_f(lift)} "
        f"({'meets' if ci else 'does not meet'} p < {alpha} and lift >= {MIN_LIFT})"
    )
    if p_holm_query is not None:
        reasons.append(
            f"query-side null: p_holm {_f(p_holm_query)}, lift {_f(lift_query)} "
            f"({'meets' if cq else 'does not meet'} p < {alpha} and lift >= {MIN_LIFT})"
        )
    c12 = ci or cq
    if probe_ba is None or chance is None:
        reasons.append("probe not available (decided on concordance alone)")
        c3 = True
    else:
        margin = probe_ba - chance
        c3 = margin >= min_probe_margin
        reasons.append(f"probe margin {margin:+.3f} {'>=' if c3 else '<'} {min_probe_margin}")
    v, p = association
    c4 = v is not None and p is not None and p < ASSOC_ALPHA and v >= MIN_ASSOCIATION
    reasons.append(
        f"label association V {_f(v)} (p {_f(p)}) {'is' if c4 else 'is not'} above "
        f"V {MIN_ASSOCIATION} / p {ASSOC_ALPHA}"
    )
    if v is not None and v >= CONFOUNDED:
        reasons.append(
            "the attribute nearly determines the label in the index: the concordance null "
            "cannot separate them; judge by the per-group precision and the examples"
        )
    concordant = bool(c12 and c3)
    return bool(concordant and c4), bool(concordant and not c4), reasons


def sensitivity_note(data: dict) -> str | None:
    """One sentence on the weakest shortcut this audit could flag: the range over attributes of
    each test's ``detectable_lift`` (runner). Out of sample, the shortcuts the rule missed were
    the weakly used ones whose lifts stayed under it, so a reader must know where it lies."""
    attrs = (data.get("attributes") or {}).values()
    ranges = []
    for side, get in (
        ("query side", lambda v: (v.get("query_null") or {}).get("detectable_lift")),
        ("index side", lambda v: v.get("detectable_lift")),
    ):
        xs = [x for x in map(get, attrs) if x is not None and np.isfinite(x)]
        if xs:
            lo, hi = min(xs), max(xs)
            ranges.append(f"{lo:.2f}" + (f"-{hi:.2f}" if hi - lo >= 0.005 else "") + f" ({side})")
    if not ranges:
        return None
    return (
        f"With {data.get('n_queries')} queries this audit can flag an attribute only from a "
        f"lift of {' or '.join(ranges)}: a shortcut weaker than that goes unflagged, so "
        "'not flagged' is not proof of no shortcut; audit more cases to see weaker ones."
    )


def _f(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3g}"


def label_association(codes: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """(Cramér's V, chi-squared p) of attribute vs label among the indexed cases (V: 0 none .. 1 determined)."""
    codes, labels = np.asarray(codes), np.asarray(labels)
    ok = codes >= 0
    if ok.sum() < 2:
        return None, None
    _, ci = np.unique(codes[ok], return_inverse=True)
    _, li = np.unique(labels[ok], return_inverse=True)
    table = np.zeros((ci.max() + 1, li.max() + 1))
    np.add.at(table, (ci, li), 1.0)
    if min(table.shape) < 2:
        return None, None
    n = table.sum()
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    chi2 = float(((table - expected) ** 2 / np.maximum(expected, 1e-12)).sum())
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    return float(np.sqrt(chi2 / (n * (min(table.shape) - 1)))), float(chi2_dist.sf(chi2, dof))
