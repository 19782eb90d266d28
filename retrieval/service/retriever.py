"""CaseRetriever: the one service the CLI, the app and the audit call.

r = CaseRetriever.load(INDEX_DIR)              # verifies the bundle's checksums
res = r.query("case.dcm", k=5, explain=("gradcam", "similarity"))
res.prediction, res.neighbors, res.ood, res.maps, res.to_json()
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from index import bundle
from index.case_store import attribute_columns, image_root, read_cases
from index.vector_index import VectorIndex
from retrieval.service import conformal
from retrieval.service import ood as ood_score
from retrieval.service.calibration import apply_temperature
from retrieval.errors import BundleError, CasebaseError
from retrieval.explain.similarity import SimilarityScale, decompose, region_pairs
from retrieval.model.device import resolve_device
from retrieval.model.embedding import ood_features
from retrieval.model.network import CaseNet, load_model
from retrieval.model.preprocess import Preprocessor
from retrieval.service.context import ImageContext
from retrieval.service.results import MatchedRegion, Neighbor, OODResult, Prediction, QueryResult
from retrieval.service.self_match import find_self_match

TRUST_FILE = "trust.json"


def _cells_box(geometry, cells: np.ndarray) -> list[int]:
    """Original-pixel bounding box of a region's feature-map cells (bool (h, w))."""
    rows, cols = np.nonzero(cells)
    grid = tuple(cells.shape)
    a = geometry.cell_box(int(rows.min()), int(cols.min()), grid)
    b = geometry.cell_box(int(rows.max()), int(cols.max()), grid)
    return [a[0], a[1], b[2], b[3]]


def _where(box: list[int], size: tuple[int, int]) -> str:
    h, w = size
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    vert = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"
    horiz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    return "centre" if vert == "middle" and horiz == "centre" else f"{vert} {horiz}"


class CaseRetriever:
    def __init__(
        self,
        index_dir: Path,
        meta: dict,
        model: CaseNet,
        cases,
        vindex: VectorIndex,
        device: torch.device,
        trust: dict | None = None,
    ):
        self.index_dir = Path(index_dir)
        self.meta = meta
        self.model = model
        self.cases = cases
        self.index = vindex
        self.device = device
        self.weighting = meta["embedding"]["weighting"]
        self.preprocessor = Preprocessor(model.config)
        self.classes = list(model.config.classes)
        self.attribute_names = attribute_columns(cases)
        self.trust = trust or {}
        self._patients = cases["patient_id"].to_numpy()
        ref = self.index_dir / ood_score.OOD_REFERENCE
        self.ood_reference = np.load(ref, allow_pickle=False) if ref.is_file() else None
        self.scale = SimilarityScale.load(self.index_dir)  # (1 + cos) / 2 for older bundles
        self.conformal = conformal.load(self.index_dir)  # None: built before prediction sets

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls, index_dir: str | Path, device: str = "auto", verify: bool = True
    ) -> CaseRetriever:
        index_dir = Path(index_dir)
        meta = bundle.verify(index_dir) if verify else bundle.read_meta(index_dir)
        dev = resolve_device(device)
        model = load_model(index_dir / "model", dev)
        cases = read_cases(index_dir / "cases.parquet", image_root(meta))
        vindex = VectorIndex.load(index_dir / "vectors.faiss", meta["faiss"]["factory"])
        if vindex.ntotal != len(cases):
            raise BundleError(
                f"{index_dir}: {vindex.ntotal} vectors but {len(cases)} cases; corrupted bundle"
            )
        if dev.type == "cuda":
            vindex.use_gpu()
        trust = {}
        if (index_dir / TRUST_FILE).is_file():
            import json

            try:
                trust = json.loads((index_dir / TRUST_FILE).read_text())
            except (ValueError, UnicodeDecodeError) as err:
                raise BundleError(f"{index_dir / TRUST_FILE}: not valid JSON ({err})") from None
        return cls(index_dir, meta, model, cases, vindex, dev, trust)

    # ------------------------------------------------------------- embedding
    def preprocess(self, image_or_path) -> torch.Tensor:
        return self.preprocessor(image_or_path)

    @torch.no_grad()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) normalised batch -> (N, D) L2-normalised embeddings."""
        return self.model.run(batch.to(self.device), self.weighting).embedding

    @torch.no_grad()
    def encode(self, src) -> ImageContext:
        image, tensor, geometry = self.preprocessor.load(src)
        out = self.model.run(tensor[None].to(self.device), self.weighting)
        return ImageContext(
            image,
            tensor,
            geometry,
            out.embedding[0],
            out.logits[0],
            out.features[0],
            out.weights[0],
            int(out.predicted[0]),
        )

    @torch.no_grad()
    def encode_many(self, sources: Sequence) -> list[ImageContext]:
        loaded = [self.preprocessor.load(s) for s in sources]
        if not loaded:
            return []
        batch = torch.stack([t for _, t, _ in loaded]).to(self.device)
        out = self.model.run(batch, self.weighting)
        return [
            ImageContext(
                img,
                t,
                g,
                out.embedding[i],
                out.logits[i],
                out.features[i],
                out.weights[i],
                int(out.predicted[i]),
            )
            for i, (img, t, g) in enumerate(loaded)
        ]

    # ---------------------------------------------------------------- search
    def _allowed(self, exclude_patient: str | None, filters: dict | None) -> np.ndarray | None:
        if not exclude_patient and not filters:
            return None
        ok = np.ones(len(self.cases), dtype=bool)
        if exclude_patient:
            ok &= self._patients != exclude_patient
        for name, wanted in (filters or {}).items():
            if name not in self.cases.columns:
                raise CasebaseError(
                    f"unknown filter attribute {name!r}; known: {', '.join(self.attribute_names)}"
                )
            values = (
                {str(wanted)} if isinstance(wanted, str | int | float) else {str(v) for v in wanted}
            )
            ok &= self.cases[name].isin(values).to_numpy()
        return ok

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        exclude_patient: str | None = None,
        filters: dict | None = None,
        exclude_patients: Sequence[str] | None = None,
    ):
        """Top-k (similarity, row) per query after exclusions; widens the search until k survive."""
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        n = self.index.ntotal
        base = self._allowed(exclude_patient, filters)
        results = []
        for qi, vec in enumerate(vectors):
            allowed = base
            if exclude_patients is not None and exclude_patients[qi]:
                mask = self._patients != exclude_patients[qi]
                allowed = mask if allowed is None else allowed & mask
            want = min(k, n if allowed is None else int(allowed.sum()))
            kk = min(n, k if allowed is None else max(2 * k, k + 16))
            while True:
                sims, ids = self.index.search(vec[None], kk)
                hits = [
                    (float(s), int(i))
                    for s, i in zip(sims[0], ids[0], strict=True)
                    if i >= 0 and (allowed is None or allowed[i])
                ]
                if len(hits) >= want or kk >= n:
                    break
                kk = min(n, kk * 4)
            results.append(hits[:k])
        return results

    # ----------------------------------------------------------------- query
    def predict(self, logits: torch.Tensor) -> Prediction:
        probs = logits.float().softmax(-1).cpu().numpy()
        return Prediction(
            self.classes[int(probs.argmax())],
            {c: float(p) for c, p in zip(self.classes, probs, strict=True)},
        )

    def knn_vote(self, hits: list[tuple[float, int]]) -> dict[str, float]:
        """Similarity-weighted label vote of the neighbours (weights clipped at 0)."""
        votes = dict.fromkeys(self.classes, 0.0)
        for sim, row in hits:
            votes[self.cases.at[row, "label"]] = votes.get(self.cases.at[row, "label"], 0.0) + max(
                sim, 0.0
            )
        total = sum(votes.values())
        if total <= 0:
            return {c: (1.0 / len(votes)) for c in votes}
        return {c: v / total for c, v in votes.items()}

    def ood(self, features: torch.Tensor) -> OODResult:
        """k-NN distance of the (C, h, w) feature map's pooled features to the reference cases."""
        cal = self.meta.get("ood") or {}
        if self.ood_reference is None or not len(self.ood_reference):
            return OODResult(0.0, False, float("inf"))
        feats = ood_features(features[None]).cpu().numpy()
        score = float(ood_score.score(feats, self.ood_reference, int(cal.get("k", 5)))[0])
        thr = float(cal.get("threshold", 1.0))
        return OODResult(score, score > thr, thr)

    def neighbor(self, sim: float, row: int) -> Neighbor:
        rec = self.cases.iloc[row]
        return Neighbor(
            case_id=rec["case_id"],
            label=rec["label"],
            similarity=sim,
            similarity_score=self.scale.score(sim),
            attributes={a: rec[a] for a in self.attribute_names},
            patient_id=rec["patient_id"],
            image=rec["image"],
            row=row,
        )

    def match_regions(
        self, q: ImageContext, c: ImageContext, nb: Neighbor, n_regions: int = 3
    ) -> None:
        dec = decompose(self.model, q.features, q.weights, c.features, c.weights)
        nb.completeness_error = dec.completeness_error
        nb.original_size = tuple(c.geometry.original_size)
        nb.matched_regions = [
            MatchedRegion(
                _cells_box(q.geometry, p.query_cells),
                _cells_box(c.geometry, p.case_cells),
                p.contribution,
                p.share,
                p.crosses_sides,
                (int(p.query_cells.sum()), int(p.case_cells.sum())),
            )
            for p in region_pairs(dec, n_regions)
        ]
        nb.maps["similarity"] = {
            "query": q.geometry.map_to_original(dec.query_map()),
            "case": c.geometry.map_to_original(dec.case_map()),
        }

    def query(
        self,
        image_or_path,
        k: int = 10,
        explain: Iterable[str] = (),
        exclude_patient: str | None = None,
        filters: dict | None = None,
        regions: bool = True,
        coverage: float | None = None,
        group: str | None = None,
        case_id: str | None = None,
        exclude_self: bool = False,
    ) -> QueryResult:
        """coverage: of the prediction sets (default: the index's); group: the query's Mondrian group."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        methods = list(dict.fromkeys(explain))
        if methods:
            from retrieval.explain import registry

            registry.check_names(methods)
        q = self.encode(image_or_path)
        timings["encode"] = time.perf_counter() - t0
        # the query may be an indexed case itself (case_id: its id when the caller knows it);
        # exclude_self leaves that case out of the neighbours (self_match.py)
        found = find_self_match(self, q, case_id)
        drop = found[1] if found is not None and exclude_self else None
        k_ = k + (drop is not None)
        hits = self.search(q.embedding.float().cpu().numpy(), k_, exclude_patient, filters)[0]
        timings["search"] = time.perf_counter() - t0 - timings["encode"]
        hits = [h for h in hits if h[1] != drop][:k]
        neighbors = [self.neighbor(s, r) for s, r in hits]
        result = QueryResult(
            self.predict(q.logits),
            self.knn_vote(hits),
            self.ood(q.features),
            neighbors,
            "",
            original_size=tuple(q.image.original_size),
            similarity_scale={"calibrated": self.scale.calibrated, "method": self.scale.method},
        )
        if found is not None:
            result.self_match = found[0]
            found[0].excluded = drop is not None
        if regions or methods:
            t1 = time.perf_counter()
            ctxs = self._neighbor_contexts(neighbors)
            for nb, c in zip(neighbors, ctxs, strict=True):
                if c is not None:
                    self.match_regions(q, c, nb)
            timings["regions"] = time.perf_counter() - t1
            if methods:
                from retrieval.explain import explain_query

                t2 = time.perf_counter()
                explain_query(self, q, neighbors, ctxs, methods, result)
                timings["explain"] = time.perf_counter() - t2
        result.trust = {m: self.trust[m] for m in methods if m in self.trust}
        self.attach_sets(result.prediction, q.embedding, coverage, group, exclude_patient)
        result.explanation_text = self.describe(result)
        timings["total"] = time.perf_counter() - t0
        result.timings = timings
        return result

    def attach_sets(
        self, p: Prediction, embedding, coverage=None, group=None, exclude_patient=None
    ) -> None:
        """Fill p's conformal sets: classifier (temperature-scaled) and neighbour vote."""
        cal = self.conformal
        if cal is None:
            p.set_note = conformal.NO_SETS_NOTE
            return
        cov = conformal.check_coverage(cal.coverage if coverage is None else coverage)
        probs = np.array([p.probabilities[c] for c in self.classes])
        pt = apply_temperature(probs, cal.temperature)
        groups = None if group is None else [str(group)]
        head = cal.heads["classifier"]
        order = np.argsort(-pt, kind="stable")
        member = head.sets(pt, cov, groups)[0]
        p.set = [self.classes[i] for i in order if member[i]]
        p.calibrated_probabilities = {c: float(v) for c, v in zip(self.classes, pt, strict=True)}
        p.set_coverage = cov
        hits = self.search(embedding.float().cpu().numpy(), cal.knn_k, exclude_patient)[0]
        code = {c: i for i, c in enumerate(self.classes)}
        lab = np.array([[code.get(self.cases.at[r, "label"], -1) for _, r in hits]])
        votes = conformal.vote_probabilities(
            np.array([[s for s, _ in hits]]), lab, len(self.classes)
        )[0]
        member = cal.heads["knn_vote"].sets(votes, cov, groups)[0]
        p.knn_set = [self.classes[i] for i in np.argsort(-votes, kind="stable") if member[i]]
        known = head.groups is not None and group is not None and (head.groups == str(group)).any()
        p.set_group = str(group) if known else None
        p.set_note = f"calibrated on {cal.calibrated_on}" + (
            f", {cal.group_attribute} = {group}"
            if known
            else (f"; group {group!r} not calibrated, pooled sets" if group is not None else "")
        )

    def _neighbor_contexts(self, neighbors: list[Neighbor]) -> list[ImageContext | None]:
        try:
            return self.encode_many([n.image for n in neighbors])
        except CasebaseError:
            out: list[ImageContext | None] = []
            for n in neighbors:  # one unreadable neighbour image must not sink the query
                try:
                    out.append(self.encode(n.image))
                except CasebaseError:
                    out.append(None)
            return out

    def describe(self, res: QueryResult) -> str:
        p = res.prediction
        text = conformal.describe_set(p)
        if res.ood.flag:
            text = (
                f"I don't know: this image is unlike the indexed cases (OOD score {res.ood.score:.3g} "
                f"above the calibrated {res.ood.threshold:.3g}); the model's guess would be {p.label} "
                f"({p.confidence:.2f})."
            )
            if p.set is not None:
                text += conformal.describe_set(p, ood_flag=True)
        if res.neighbors:
            counts = Counter(n.label for n in res.neighbors)
            parts = ", ".join(f"{c} {lab}" for lab, c in counts.most_common())
            text += f" The {len(res.neighbors)} most similar cases are {parts}"
            scores = [n.similarity_score for n in res.neighbors if n.similarity_score is not None]
            if scores:
                span = f"{max(scores):.2f}" + (f" to {min(scores):.2f}" if len(scores) > 1 else "")
                text += f" (similarity score {span}" + (
                    ", where 0.50 is a typical top-10 match in this index)"
                    if self.scale.calibrated
                    else "; uncalibrated index: (1 + cosine) / 2, rebuild it for a calibrated score)"
                )
            tops = [n.matched_regions[0] for n in res.neighbors if n.matched_regions]
            if tops:
                b = np.median(np.array([t.query_box for t in tops]), axis=0).astype(int).tolist()
                text += (
                    f"; they match mainly on the region at x {b[0]}–{b[2]}, y {b[1]}–{b[3]} in the "
                    f"{_where(b, res.original_size)} of the image"
                )
                carried = [sum(r.share for r in n.matched_regions) for n in res.neighbors]
                text += (
                    f" (the matched regions carry a median {np.median(carried):.0%} of each "
                    "similarity)"
                )
            text += "."
        return text
