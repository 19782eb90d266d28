"""`run_audit`: every audit step on one embedded split, into one JSON-ready result.

The split is embedded once (`retrieval.service.evaluate.embed_split`, neighbours of
the query's own patient excluded, k = 5); concordance, groups, counterfactual
and the worst examples all read that one (queries × 5) neighbour matrix. The
probe reads the indexed vectors; leakage searches again without exclusions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from retrieval.audit import verdict
from retrieval.audit.attributes import CodedAttribute, select_attributes
from retrieval.audit.concordance import (
    concordance_test,
    detectable_lift,
    holm,
    query_permutation_test,
)
from retrieval.audit.counterfactual import MAX_QUERIES, audit_counterfactual
from retrieval.audit.examples import Example, build_examples, pick_attribute
from retrieval.audit.groups import group_precision, label_precision, spread
from retrieval.audit.leakage import audit_leakage
from retrieval.audit.probe import probe_attribute
from retrieval.errors import CasebaseError
from retrieval.jsonsafe import clean
from retrieval.service.evaluate import embed_split

K = 5


@dataclass
class AuditResult:
    data: dict  # the JSON object (`casebase audit --json`)
    examples: list[Example] = field(default_factory=list)
    concept_examples: dict[str, list[str]] = field(default_factory=dict)  # concept -> image paths


def neighbor_matrix(
    hits: list[list[tuple[float, int]]], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows (nq, k), similarities (nq, k), valid (nq, k)) from per-query hit lists."""
    nq = len(hits)
    rows = np.zeros((nq, k), dtype=np.int64)
    sims = np.zeros((nq, k), dtype=np.float32)
    valid = np.zeros((nq, k), dtype=bool)
    for i, h in enumerate(hits):
        for j, (s, row) in enumerate(h[:k]):
            rows[i, j], sims[i, j], valid[i, j] = row, s, True
    return rows, sims, valid


def judge_attributes(
    attrs: list[CodedAttribute],
    rows: np.ndarray,
    valid: np.ndarray,
    index_labels: np.ndarray,
    index_patients: np.ndarray,
    index_vectors: np.ndarray,
    query_labels: np.ndarray,
    query_patients: np.ndarray,
    permutations: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict]:
    """Both concordance tests, the probe and the verdict for every attribute (JSON-ready dicts).

    rows / valid: the (queries × k) neighbour rows into the index and which are real.
    """
    qlabels, qpatients = query_labels, query_patients
    # the smallest permutation p is 1/(B+1); Holm multiplies it by up to len(attrs): make sure a
    # clear signal can still reach the flag level (with room to spare)
    n_perm = permutations
    if permutations > 0 and attrs:
        n_perm = max(permutations, math.ceil(4 * len(attrs) / verdict.ALPHA) - 1)
    per_attr: dict[str, dict] = {}
    conc, qnull = {}, {}
    for i, a in enumerate(
        tqdm(attrs, desc="concordance + probe", unit="attr", disable=not progress, leave=False)
    ):
        rng = np.random.default_rng([seed, i])
        clusters = qpatients if (np.asarray(qpatients) != "").any() else None
        conc[a.name] = concordance_test(
            rows, valid, a.query_codes, a.index_codes, index_labels, n_perm, rng, clusters
        )
        qnull[a.name] = query_permutation_test(
            rows, valid, a.query_codes, a.index_codes, qlabels, n_perm, rng
        )
        with threadpool_limits(1):  # BLAS threads only oversubscribe small probe fits
            pr = probe_attribute(index_vectors, a.index_codes, index_labels, index_patients, seed)
        per_attr[a.name] = {"probe": pr}
    names = [a.name for a in attrs]
    # two families, each Holm-corrected over the attributes: the index-side test (the primary one)
    # and the query-side test (catches label-proxy shortcuts); see verdict
    p_holm = holm([conc[n].p_value for n in names])
    p_holm_q = holm([qnull[n].p_value for n in names])
    # the weakest lift each test could flag here: Holm lets the strongest attribute through at
    # ALPHA / m, and the verdict never flags below MIN_LIFT
    level = verdict.ALPHA / max(len(names), 1)

    def floor(x: float | None) -> float | None:
        return None if x is None else max(verdict.MIN_LIFT, x)

    out_attrs: dict[str, dict] = {}
    for a, ph, phq in zip(attrs, p_holm, p_holm_q, strict=True):
        c, pr, cq = conc[a.name], per_attr[a.name]["probe"], qnull[a.name]
        assoc = verdict.label_association(a.index_codes, index_labels)
        flagged, bias, reasons = verdict.decide(
            ph, c.lift, pr.balanced_accuracy, pr.chance, assoc, phq, cq.lift
        )
        out_attrs[a.name] = {
            "kind": a.kind,
            "binning": a.binning,
            "groups": a.groups,
            "concordance": c.concordance,
            "expected": c.expected,
            "lift": c.lift,
            "p_value": c.p_value,
            "p_value_holm": ph,
            "interval": list(c.interval),
            "null_interval": list(c.null_interval),
            "n_queries": c.n_queries,
            "permutations": c.permutations,
            "detectable_lift": floor(detectable_lift(c.null, c.expected, level)),
            "query_null": {
                **cq.to_json(),
                "p_value_holm": phq,
                "detectable_lift": floor(detectable_lift(cq.null, cq.expected, level)),
            },
            "probe_balanced_accuracy": pr.balanced_accuracy,
            "chance": pr.chance,
            "probe": pr.to_json(),
            "label_association": assoc[0],
            "label_association_p": assoc[1],
            "flagged": flagged,
            "retrieval_bias": bias,
            "reasons": reasons,
        }
    return out_attrs


def run_audit(
    r,
    manifest,
    split: str = "test",
    attributes: list[str] | None = None,
    permutations: int = 1000,
    seed: int = 0,
    progress: bool = True,
    max_counterfactual: int = MAX_QUERIES,
    examples: bool = True,
    hash_pixels: bool = True,
    concepts: list[tuple[str, str]] | None = None,
) -> AuditResult:
    if permutations < 0:
        raise CasebaseError("--permutations must be 0 or more")
    t0, cpu0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}

    cpu_mark = [cpu0]

    def lap(name: str, since: float) -> float:
        now, cpu = time.perf_counter(), time.process_time()
        timings[name] = round(now - since, 3)
        timings[f"{name}_cpu"] = round(cpu - cpu_mark[0], 3)
        cpu_mark[0] = cpu
        return now

    if attributes:  # fail before the slow part
        select_attributes(r.cases, r.cases, r.attribute_names, attributes)
    qs = embed_split(r, manifest, split, K, progress)
    if not len(qs.cases):
        raise CasebaseError(f"no image of split {split!r} could be read")
    t = lap("embed", t0)
    attrs, skipped = select_attributes(r.cases, qs.cases, r.attribute_names, attributes)
    index_labels = r.cases["label"].astype(str).to_numpy()
    index_patients = r.cases["patient_id"].astype(str).to_numpy()
    qlabels = qs.cases["label"].astype(str).to_numpy()
    qpatients = qs.cases["patient_id"].astype(str).to_numpy()
    rows, _, valid = neighbor_matrix(qs.hits, K)
    index_vectors = r.index.reconstruct_all()

    out_attrs = judge_attributes(
        attrs,
        rows,
        valid,
        index_labels,
        index_patients,
        index_vectors,
        qlabels,
        qpatients,
        permutations,
        seed,
        progress,
    )
    t = lap("concordance_probe", t)

    precision = label_precision(index_labels[rows], valid, qlabels)
    groups = {a.name: group_precision(a, precision, seed) for a in attrs}
    for a in attrs:
        out_attrs[a.name]["group_precision_spread"] = spread(groups[a.name])
    t = lap("groups", t)

    counterfactual = audit_counterfactual(
        r, qs.cases, qs.hits, attrs, K, max_counterfactual, seed, progress
    )
    t = lap("counterfactual", t)
    leakage = audit_leakage(r, qs.cases, qs.vectors, K, progress, seed, hash_pixels)
    t = lap("leakage", t)

    ex: list[Example] = []
    suspect = pick_attribute(out_attrs)
    if examples and suspect is not None:
        attr = next(a for a in attrs if a.name == suspect)
        ex = build_examples(r, qs.cases, qs.hits, attr, k=K)
    t = lap("examples", t)
    concept_data, concept_ex = None, {}
    if concepts:  # TCAV tests of artefact concepts (retrieval/concepts/audit.py)
        from retrieval.concepts.audit import audit_concepts

        concept_data, concept_ex = audit_concepts(r, manifest, concepts, seed, progress)
        t = lap("concepts", t)
    timings["total"] = round(time.perf_counter() - t0, 3)
    timings["cpu_total"] = round(time.process_time() - cpu0, 3)

    data = {
        "split": split,
        "n_queries": int(len(qs.cases)),
        "n_indexed": int(r.index.ntotal),
        "queries_with_patient_id": int((qpatients != "").sum()),
        "k": K,
        "weighting": r.weighting,
        "precision_at_5": float(np.nanmean(precision)) if np.isfinite(precision).any() else None,
        "attributes": out_attrs,
        "skipped_attributes": skipped,
        "flagged": [n for n, v in out_attrs.items() if v["flagged"]],
        "retrieval_bias": [n for n, v in out_attrs.items() if v["retrieval_bias"]],
        "flag_rule": verdict.RULE,
        "groups": groups,
        "counterfactual": counterfactual,
        "leakage": leakage,
        "examples_attribute": suspect if ex else None,
        "skipped_queries": qs.skipped,
        "permutations": max((v["permutations"] for v in out_attrs.values()), default=permutations),
        "permutations_requested": permutations,
        "seed": seed,
        "timings": timings,
    }
    # calibration and the classifier's prediction sets on the audited split (issue 21)
    from retrieval.service.uncertainty import uncertainty_sections

    data["prediction_sets"], data["calibration"] = uncertainty_sections(r, qs, knn=False)
    if concept_data is not None:
        data["concepts"] = concept_data
        data["concept_shortcuts"] = concept_data["shortcuts"]
        data["concept_influences"] = concept_data.get("influences", [])
    return AuditResult(clean(data), ex, concept_ex)
