"""`casebase eval`: retrieval quality of an index on a split.

Neighbours from the query's own patient are excluded. precision_at_1 and
map_at_r come from pytorch-metric-learning's AccuracyCalculator, fed our own
patient-excluding k-NN (k = the largest class count in the index, capped at
1000, so MAP@R is exact up to that size); precision_at_5/10 (share of the top
k sharing the query's label) and knn_accuracy (similarity-weighted vote of
the top 10 equals the label) are computed from the same neighbours.
`attribute_agreement` is the share of the top-5 neighbours sharing the
query's value of each attribute (e.g. site: do we retrieve by hospital?),
with every attribute coded exactly as the audit codes it
(`retrieval.audit.attributes`: a numeric one such as age in quartiles of the
indexed cases, said in `attribute_binning`), so eval's agreement and the
audit's concordance are the same number.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from retrieval.data.manifest import load_manifest
from retrieval.errors import CasebaseError
from retrieval.model.embedding import embed_paths
from retrieval.service.retriever import CaseRetriever
from retrieval.service.uncertainty import uncertainty_sections

MAX_K = 1000


@dataclass
class EvalReport:
    n_queries: int
    precision_at_1: float
    precision_at_5: float
    precision_at_10: float
    map_at_r: float
    knn_accuracy: float
    classifier_accuracy: float
    per_class: dict[str, dict] = field(default_factory=dict)
    attribute_agreement: dict[str, float] = field(default_factory=dict)
    attribute_binning: dict[str, str] = field(default_factory=dict)  # binned attributes (age)
    ood_flag_rate: float = 0.0  # share of these (in-distribution) queries flagged "I don't know"
    prediction_sets: dict = field(default_factory=dict)  # conformal sets on this split
    calibration: dict = field(default_factory=dict)  # ECE before / after temperature scaling
    weighting: str = ""
    split: str = ""
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class QuerySet:
    """A split embedded once, with its neighbours: what eval and audit both start from."""

    cases: object  # DataFrame of the embedded queries
    vectors: np.ndarray
    probabilities: np.ndarray
    hits: list[list[tuple[float, int]]]
    skipped: list[str]
    ood_features: np.ndarray | None = None


def warn_key_mismatch(r: CaseRetriever, manifest) -> bool:
    """Say so (stderr, once) when the manifest's raw patient ids were hashed under another PHI
    key than the bundle's: the queries' patients then never match the index's, so the own
    patient is not excluded and leakage goes unseen. True when it warned."""
    from retrieval.data.privacy import key_check

    want = r.meta.get("patient_key_check")
    if not (manifest.ids_hashed_on_read and want) or key_check() == want:
        return False
    print(
        f"warning: {manifest.path.name} holds raw patient ids, hashed here under another PHI key "
        "than the index's were: its patients cannot be matched to the index's, so a query's own "
        "patient is not excluded. Use the key the index was built with ($CASEBASE_HOME/phi.key "
        "or CASEBASE_PHI_KEY).",
        file=sys.stderr,
    )
    return True


def embed_split(
    r: CaseRetriever, manifest_path, split: str, k: int, progress: bool = True
) -> QuerySet:
    from index.builder import add_shape_attribute, case_table

    manifest = load_manifest(manifest_path)
    df = manifest.select([split])
    if df.empty:
        raise CasebaseError(f"{manifest_path}: no cases in split {split!r}")
    cases = case_table(manifest, df)
    warn_key_mismatch(r, manifest)
    emb = embed_paths(
        r.model,
        r.preprocessor,
        cases["image"].tolist(),
        r.weighting,
        device=r.device,
        progress=progress,
        desc=f"embedding {split}",
    )
    kept = add_shape_attribute(
        cases.iloc[emb.ok].reset_index(drop=True), emb.sizes, like=r.attribute_names
    )
    hits = r.search(emb.vectors, k, exclude_patients=kept["patient_id"].tolist())
    return QuerySet(
        kept,
        emb.vectors,
        emb.probabilities,
        hits,
        [f.message for f in emb.failures],
        emb.ood_features,
    )


def _ood_rate(r: CaseRetriever, qs: QuerySet) -> float:
    from retrieval.service import ood

    if r.ood_reference is None or qs.ood_features is None:
        return 0.0
    cal = r.meta.get("ood") or {}
    scores = ood.score(qs.ood_features, r.ood_reference, int(cal.get("k", ood.OOD_K)))
    return float((scores > float(cal.get("threshold", 1.0))).mean())


def attribute_agreement(
    r: CaseRetriever, qs: QuerySet, top: np.ndarray
) -> tuple[dict[str, float], dict[str, str]]:
    """Share of the (queries x 5) neighbours `top` sharing each query's attribute group, the
    groups coded as the audit codes them; queries missing the attribute are left out."""
    from retrieval.audit.attributes import select_attributes

    coded, _ = select_attributes(r.cases, qs.cases, r.attribute_names, None)
    agreement, binning = {}, {}
    for a in coded:
        known = a.query_codes >= 0
        if not known.any():
            continue
        same = a.index_codes[top[known]] == a.query_codes[known, None]
        agreement[a.name] = float(same.mean())
        if a.binning:
            binning[a.name] = a.binning
    return agreement, binning


def evaluate(
    r: CaseRetriever,
    manifest_path,
    split: str = "test",
    progress: bool = True,
    coverage: float | None = None,
) -> EvalReport:
    index_labels = r.cases["label"].to_numpy()
    classes = sorted(set(index_labels) | set(r.classes))
    code = {c: i for i, c in enumerate(classes)}
    max_bin = int(max(np.unique(index_labels, return_counts=True)[1]))
    k = max(10, min(MAX_K, max_bin))
    qs = embed_split(r, manifest_path, split, k, progress)
    if not len(qs.cases):
        raise CasebaseError("no query image could be read")
    qlab = qs.cases["label"].to_numpy()
    knn = np.array(
        [[row for _, row in h] + [h[-1][1]] * (k - len(h)) for h in qs.hits], dtype=np.int64
    )
    sims = np.array(
        [[s for s, _ in h] + [h[-1][0]] * (k - len(h)) for h in qs.hits], dtype=np.float32
    )

    def precomputed(query, num_k, reference, ref_includes_query):
        return torch.from_numpy(sims[:, :num_k]), torch.from_numpy(knn[:, :num_k])

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k=k,
        knn_func=precomputed,
        device=torch.device("cpu"),
    )
    q_codes = np.array([code.get(v, -1) for v in qlab], dtype=np.float32)
    ref_codes = np.array([code[v] for v in index_labels], dtype=np.float32)
    acc = calc.get_accuracy(qs.vectors, q_codes, r.index.reconstruct_all(), ref_codes)
    nn_labels = index_labels[knn]
    match = nn_labels == qlab[:, None]
    votes = [r.knn_vote(h[:10]) for h in qs.hits]
    knn_pred = np.array([max(v, key=v.get) for v in votes])
    clf_pred = np.array(r.classes)[qs.probabilities.argmax(1)]
    per_class = {}
    for c in sorted(set(qlab)):
        m = qlab == c
        per_class[c] = {
            "n": int(m.sum()),
            "precision_at_5": float(match[m, :5].mean()),
            "knn_accuracy": float((knn_pred[m] == c).mean()),
        }
    agreement, binning = attribute_agreement(r, qs, knn[:, :5])
    sets, calibration = uncertainty_sections(r, qs, coverage)
    return EvalReport(
        n_queries=len(qlab),
        precision_at_1=float(acc["precision_at_1"]),
        precision_at_5=float(match[:, :5].mean()),
        precision_at_10=float(match[:, :10].mean()),
        map_at_r=float(acc["mean_average_precision_at_r"]),
        knn_accuracy=float((knn_pred == qlab).mean()),
        classifier_accuracy=float((clf_pred == qlab).mean()),
        per_class=per_class,
        attribute_agreement=agreement,
        attribute_binning=binning,
        ood_flag_rate=_ood_rate(r, qs),
        weighting=r.weighting,
        split=split,
        skipped=qs.skipped,
        prediction_sets=sets,
        calibration=calibration,
    )
