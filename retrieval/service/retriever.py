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
from index.fingerprints import PixelFingerprints
from index.region_index import RegionIndex
from index.vector_index import VectorIndex
from retrieval.errors import BundleError, CasebaseError
from retrieval.explain.similarity import SimilarityScale, decompose, region_pairs
from retrieval.model.device import resolve_device
from retrieval.model.embedding import ood_features
from retrieval.model.network import CaseNet, load_model
from retrieval.model.preprocess import Preprocessor
from retrieval.service import conformal, refine
from retrieval.service import ood as ood_score
from retrieval.service.calibration import apply_temperature
from retrieval.service.context import ImageContext
from retrieval.service.results import (
    MatchedRegion,
    Neighbor,
    OODResult,
    Prediction,
    QueryResult,
    box_ranges,
)
from retrieval.service.self_match import find_self_match

TRUST_FILE = "trust.json"
# class names taken, case-insensitively, as the lesion-free class that class explanations are
# contrasted with (--reference-class auto); see retrieval.explain.registry.explained_logits
REFERENCE_NAMES = ("normal", "no finding", "healthy")


def find_reference_class(classes: Sequence[str]) -> str | None:
    """The label set's lesion-free class by name, or None (then every class explains its logit)."""
    for c in classes:
        if str(c).strip().lower() in REFERENCE_NAMES:
            return str(c)
    return None


def _where(box: list[int], size: tuple[int, ...]) -> str:
    if len(box) == 6:  # a volume: [x0, y0, z0, x1, y1, z1] in (D, H, W)
        where = _where([box[0], box[1], box[3], box[4]], size[1:])
        return f"{where} of slices {box[2]}–{box[5] - 1}"
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
        self.set_reference_class("auto")
        self._patients = cases["patient_id"].to_numpy()
        ref = self.index_dir / ood_score.OOD_REFERENCE
        self.ood_reference = np.load(ref, allow_pickle=False) if ref.is_file() else None
        self.scale = SimilarityScale.load(self.index_dir)  # (1 + cos) / 2 for older bundles
        self.conformal = conformal.load(self.index_dir)  # None: built before prediction sets
        # Stored feature cells (bundle format 2): matched regions without re-encoding neighbours,
        # and search by region. None for older bundles (matched regions re-encode, said once).
        self.region_index = RegionIndex.load(self.index_dir, meta)
        # stored pixel fingerprints: the self-match check reads no image (None: older bundles)
        self.fingerprints = PixelFingerprints.load(self.index_dir, len(cases))
        self._case_rows: dict[str, int] | None = None
        if self.region_index is None and model.is_volume:
            _say_once(
                self.index_dir,
                f"note: {self.index_dir} holds a volume model built without a region index "
                "(before volumes had one): matched regions re-encode each neighbour's volume and "
                "--region is unavailable; `casebase index build` again to upgrade it",
            )
        elif self.region_index is None:
            _say_once(
                self.index_dir,
                f"note: {self.index_dir} has no region index (built before bundle format 2): "
                "matched regions re-encode each neighbour's image and --region is unavailable; "
                "`casebase index build` again to upgrade it",
            )

    def set_reference_class(self, name: str | None = "auto") -> str | None:
        """Contrast class explanations with this class ("why c rather than normal?"): "auto"
        finds a lesion-free class by name (REFERENCE_NAMES), None or "none" turns it off.
        Explanations only: predictions, the embedding and the index do not change."""
        if name == "auto":
            name = find_reference_class(self.classes)
        elif name is None or str(name).lower() == "none":
            name = None
        elif name not in self.classes:
            raise CasebaseError(
                f"--reference-class {name!r} is not a class of this index "
                f"({', '.join(self.classes)}); give one of them, auto or none"
            )
        self.model.explain_reference = None if name is None else self.classes.index(name)
        return name

    @property
    def reference_class(self) -> str | None:
        """The class that class explanations are contrasted with (None: each class's logit)."""
        ref = self.model.explain_reference
        return None if ref is None else self.classes[ref]

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
            None if out.lesion_fraction is None else out.lesion_fraction[0],
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
                None if out.lesion_fraction is None else out.lesion_fraction[i],
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
            match = self.cases[name].astype(str).isin(values).to_numpy()
            if not match.any():
                # an empty neighbour list would read as "no similar case", with a uniform vote
                raise CasebaseError(
                    f"filter {_filter_text(name, values)} matches no indexed case; "
                    f"{name} has {_some_values(self.cases[name])}"
                )
            ok &= match
        if filters and len(filters) > 1 and not ok.any():
            both = " and ".join(_filter_text(n, w) for n, w in filters.items())
            raise CasebaseError(f"filters {both} match no indexed case together")
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
        self._note_extent(nb, dec, c.lesion_area)
        nb.matched_regions = [
            MatchedRegion(
                refine.cells_box(q.geometry, p.query_cells),
                refine.cells_box(c.geometry, p.case_cells),
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
        like: Sequence[str] = (),
        unlike: Sequence[str] = (),
        region: Sequence[float] | None = None,
        case_id: str | None = None,
        exclude_self: bool = False,
        concepts: dict[str, float] | None = None,
    ) -> QueryResult:
        """coverage: of the prediction sets (default: the index's); group: the query's Mondrian group.

        like / unlike: case ids marked good / bad (Rocchio feedback, refine.py; an unlike case
        never comes back). region: (x0, y0, x1, y1) in the query's original pixels: cases are
        ranked by how well a region of theirs matches it (MaxSim over feature cells,
        index.region_index), and matched regions start inside it. regions=False: none computed.
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        methods = list(dict.fromkeys(explain))
        if methods:
            from retrieval.explain import registry

            registry.check_names(methods)  # every method runs on images and volumes alike
        q = self.encode(image_or_path)
        timings["encode"] = time.perf_counter() - t0
        # the query may be an indexed case itself (case_id: its id when the caller knows it);
        # exclude_self leaves that case out of the neighbours (self_match.py)
        found = find_self_match(self, q, case_id)
        drop = found[1] if found is not None and exclude_self else None
        k_ = k + (drop is not None)
        # concept-refined search: {name: weight} of stored concepts (retrieval/concepts/store.py)
        if concepts:
            from retrieval.concepts.store import refine_embedding

            q.embedding = refine_embedding(self.index_dir, q.embedding, concepts)
        if like or unlike or region is not None:
            hits, refined = self._refined_search(
                q, k_, exclude_patient, filters, like, unlike, region
            )
        else:
            hits = self.search(q.embedding.float().cpu().numpy(), k_, exclude_patient, filters)[0]
            refined = None
        timings["search"] = time.perf_counter() - t0 - timings["encode"]
        hits = [h for h in hits if h[1] != drop][:k]
        neighbors = [self.neighbor(s, r) for s, r in hits]
        if refined is not None:
            hits = refined.apply(neighbors, hits)
        result = QueryResult(
            self.predict(q.logits),
            self.knn_vote(hits),
            self.ood(q.features),
            neighbors,
            "",
            original_size=tuple(q.image.original_size),
            similarity_scale={"calibrated": self.scale.calibrated, "method": self.scale.method},
        )
        if refined is not None:
            refined.describe(result)
        result.concepts = dict(concepts) if concepts else None
        result.lesion_area = q.lesion_area
        result.reference_class = self.reference_class
        if found is not None:
            result.self_match = found[0]
            found[0].excluded = drop is not None
        if regions or methods:
            t1 = time.perf_counter()
            if self.region_index is not None:  # from the bundle: no neighbour image is read
                sel = refined.selection if refined is not None else None
                self.stored_regions_many(q, neighbors, selection=sel)
                ctxs = self._neighbor_contexts(neighbors) if methods else []
            else:
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
        # Trust was measured on in-distribution cases: it says nothing about a query flagged
        # "I don't know", so such a query carries none rather than a borrowed caption.
        if not result.ood.flag:
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
        p.temperature = float(cal.temperature)
        p.n_calibration = head.n_scores(group)
        p.set_uninformative = conformal.too_few_note(p.n_calibration, cov)
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
                f"({p.confidence_text})."
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
                # a volume's slices are in box_ranges' z already: place it in-plane only
                vol = len(b) == 6
                plane = (
                    ([b[0], b[1], b[3], b[4]], res.original_size[1:])
                    if vol
                    else (b, res.original_size)
                )
                text += (
                    f"; they match mainly on the region at {box_ranges(b)} "
                    f"in the {_where(*plane)} of the {'volume' if vol else 'image'}"
                )
                carried = [sum(r.share for r in n.matched_regions) for n in res.neighbors]
                text += (
                    f" (the matched regions carry a median {np.median(carried):.0%} of each "
                    "similarity)"
                )
            text += _lesion_size_text(res)
            text += "."
        return text

    # ------------------------------------------------------------ refinement (refine.py)
    def rows_of(self, case_ids: Iterable[str]) -> list[int]:
        """Index rows of case ids; CasebaseError naming every id the index does not hold."""
        if self._case_rows is None:
            self._case_rows = {str(c): i for i, c in enumerate(self.cases["case_id"])}
        ids = refine.parse_ids(case_ids)
        unknown = [c for c in ids if c not in self._case_rows]
        if unknown:
            raise CasebaseError(
                f"unknown case id{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                f"not in {self.index_dir}"
            )
        return [self._case_rows[c] for c in ids]

    def case_embedding(self, row: int) -> np.ndarray:
        """A stored case's unit embedding: from the vector index, its cells, or its image."""
        try:
            return np.asarray(self.index.index.reconstruct(int(row)), np.float32).reshape(-1)
        except RuntimeError:  # an index without a direct map (IVF): rebuild it otherwise
            rebuilt = self.stored_embedding(row)
            if rebuilt is not None:
                return rebuilt
            return self.encode(self.cases.at[row, "image"]).embedding.float().cpu().numpy()

    def stored_embedding(self, row: int) -> np.ndarray | None:
        """The case's embedding rebuilt from the region index (its cells, and its lesion
        fractions for a model with an extent head); None when the bundle cannot."""
        ri = self.region_index
        if ri is None or (self.model.has_extent and ri.lesion is None):
            return None
        e = ri.embedding(row)
        if not self.model.has_extent:
            return e
        f = torch.from_numpy(np.asarray(ri.lesion[row : row + 1], np.float32))
        v = self.model.with_extent(torch.from_numpy(e)[None], self.model.extent_angle(f))
        return v[0].float().numpy()

    def query_cells(self, q: ImageContext) -> tuple[np.ndarray, np.ndarray]:
        """(P·F per cell (h·w, D) float64, pooling weights (h·w,) float64) of the query."""
        from retrieval.model.embedding import cell_vectors

        z = cell_vectors(self.model, q.features[None])[0].astype(np.float64)
        return z, q.weights.double().reshape(-1).cpu().numpy()

    def _refined_search(self, q, k, exclude_patient, filters, like, unlike, region):
        self.rows_of(refine.parse_ids(like) + refine.parse_ids(unlike))  # names every unknown id
        like_rows, unlike_rows = self.rows_of(like), self.rows_of(unlike)
        both = sorted(set(like_rows) & set(unlike_rows))
        if both:
            ids = ", ".join(str(self.cases.at[r, "case_id"]) for r in both)
            raise CasebaseError(f"case {ids} is both liked and unliked")
        out = _Refined(like_rows, unlike_rows, self.cases["case_id"].to_numpy())
        drop = set(unlike_rows)
        if region is None:
            d = int(q.embedding.shape[0])
            vec = refine.rocchio(
                q.embedding.float().cpu().numpy(),
                np.array([self.case_embedding(r) for r in like_rows]).reshape(-1, d),
                np.array([self.case_embedding(r) for r in unlike_rows]).reshape(-1, d),
            )
            hits = self.search(vec, k + len(drop), exclude_patient, filters)[0]
            return [h for h in hits if h[1] not in drop][:k], out
        if self.region_index is None:
            raise CasebaseError(
                f"{self.index_dir} has no region index (built before bundle format 2); "
                "`casebase index build` it again to search by region"
            )
        sel = refine.select_cells(region, q.geometry, q.grid)
        out.selection = sel
        qz, _ = self.query_cells(q)
        cells = qz[sel.cells.reshape(-1)]
        if like_rows or unlike_rows:
            ri = self.region_index
            cells = refine.rocchio_cells(
                cells,
                [np.asarray(ri.cells[r], np.float32) for r in like_rows],
                [np.asarray(ri.cells[r], np.float32) for r in unlike_rows],
            )
        allowed = self._allowed(exclude_patient, filters)
        if drop:
            allowed = np.ones(len(self.cases), bool) if allowed is None else allowed.copy()
            allowed[list(drop)] = False
        found = self.region_index.search(cells, k, allowed)
        qe = q.embedding.float().cpu().numpy()
        out.region_scores = {h.row: h.score for h in found}
        return [(float(qe @ self.case_embedding(h.row)), h.row) for h in found], out

    def stored_regions(
        self, q: ImageContext, nb: Neighbor, n_regions: int = 3, selection=None, qcells=None
    ):
        """nb's matched regions and similarity maps from the region index (no image read).

        qcells: query_cells(q), when the caller computes it once for all neighbours."""
        self.stored_regions_many(q, [nb], n_regions, selection, qcells)

    def _note_extent(self, nb: Neighbor, dec, lesion_area: float | None) -> None:
        """The neighbour's predicted lesion area and the share of its similarity that is
        agreement in lesion size (models with an extent head)."""
        if not self.model.has_extent or lesion_area is None:
            return
        nb.lesion_area = lesion_area
        nb.lesion_size_share = (
            dec.extent_term / dec.similarity if abs(dec.similarity) > 1e-12 else 0.0
        )

    def _stored_extent(self, q: ImageContext, rows: np.ndarray) -> refine.StoredExtent | None:
        """The query's and the stored cases' extent codes (None for a model without one)."""
        ri = self.region_index
        if not self.model.has_extent or q.lesion_fraction is None or ri.lesion is None:
            return None
        from retrieval.model import extent

        c = float(self.model.config.extent_weight)
        fq = q.lesion_fraction.float().cpu()
        fc = torch.from_numpy(np.asarray(ri.lesion[rows], np.float32))
        return refine.StoredExtent(
            c,
            extent.code(self.model.extent_angle(fq[None]), c)[0].double().numpy(),
            extent.code(self.model.extent_angle(fc), c).double().numpy(),
            fq.reshape(-1).numpy(),
            fc.numpy(),
        )

    def stored_regions_many(
        self,
        q: ImageContext,
        neighbors: list[Neighbor],
        n_regions: int = 3,
        selection=None,
        qcells=None,
    ) -> None:
        """Every neighbour's matched regions and similarity maps from the region index, no image
        read; the neighbours are decomposed in one batched matmul and their maps resized in one
        interpolation per image size (a query with matched regions then costs little more than
        one without: bench/refine.py)."""
        if not neighbors:
            return
        ri = self.region_index
        qz, qw = self.query_cells(q) if qcells is None else qcells
        rows = np.array([nb.row for nb in neighbors], np.int64)
        order = np.argsort(rows)  # sorted reads from the memory map
        cz = np.empty((len(rows),) + ri.cells.shape[1:], np.float64)
        cz[order] = ri.cells[rows[order]]
        decs = refine.stored_decompositions(
            qz,
            qw,
            cz,
            ri.weights[rows],
            [nb.similarity for nb in neighbors],
            q.grid,
            ri.grid,
            self._stored_extent(q, rows),
        )
        q_maps = q.geometry.maps_to_original(np.stack([d.query_map() for d in decs]))
        sizes = [tuple(int(v) for v in ri.sizes[r]) for r in rows]
        c_maps: list = [None] * len(rows)
        for size in set(sizes):
            at = [i for i, sz in enumerate(sizes) if sz == size]
            for i, m in zip(
                at,
                self.preprocessor.geometry_of(size).maps_to_original(
                    np.stack([decs[i].case_map() for i in at])
                ),
                strict=True,
            ):
                c_maps[i] = m
        for nb, dec, size, q_map, c_map in zip(neighbors, decs, sizes, q_maps, c_maps, strict=True):
            nb.completeness_error = dec.completeness_error
            if ri.lesion is not None:
                self._note_extent(nb, dec, float(np.mean(ri.lesion[nb.row])))
            c_geom = self.preprocessor.geometry_of(size)
            nb.original_size = size
            shown = dec if selection is None else refine.restrict_rows(dec, selection.cells)
            boxes = []
            for p in region_pairs(shown, n_regions):
                qbox = refine.cells_box(q.geometry, p.query_cells)
                if selection is not None:
                    qbox = refine.clip_box(qbox, selection.clip)
                boxes.append(
                    MatchedRegion(
                        qbox,
                        refine.cells_box(c_geom, p.case_cells),
                        p.contribution,
                        p.share,
                        p.crosses_sides,
                        (int(p.query_cells.sum()), int(p.case_cells.sum())),
                    )
                )
            nb.matched_regions = boxes
            nb.maps["similarity"] = {"query": q_map, "case": c_map}


class _Refined:
    """What a refined search adds to the result: feedback, region, per-neighbour region score."""

    def __init__(self, like_rows: list[int], unlike_rows: list[int], case_ids):
        self.like_rows, self.unlike_rows = like_rows, unlike_rows
        self.case_ids = case_ids
        self.selection: refine.RegionSelection | None = None
        self.region_scores: dict[int, float] = {}

    def apply(self, neighbors: list[Neighbor], hits):
        """Region score on each neighbour; the hits the k-NN vote weighs (region score if any)."""
        if not self.region_scores:
            return hits
        for nb in neighbors:
            nb.region_score = self.region_scores.get(nb.row)
        return [(self.region_scores[r], r) for _, r in hits]

    def describe(self, result: QueryResult) -> None:
        if self.like_rows or self.unlike_rows:
            result.feedback = {
                "like": [str(self.case_ids[r]) for r in self.like_rows],
                "unlike": [str(self.case_ids[r]) for r in self.unlike_rows],
                "method": refine.FEEDBACK_FORMULA
                + ("; per query cell of the region" if self.selection is not None else ""),
            }
        if self.selection is not None:
            result.region = list(self.selection.asked)
            result.region_searched = list(self.selection.searched)
            result.region_note = self.selection.note


def _filter_text(name: str, wanted) -> str:
    values = [wanted] if isinstance(wanted, str | int | float) else sorted(map(str, wanted))
    return f"{name}={'|'.join(map(str, values))}"


def _some_values(column, shown: int = 8) -> str:
    """A few of a case column's values, most frequent first: what a filter could ask for."""
    counts = column.astype(str).value_counts()
    vals = [repr(v) for v in counts.index[:shown]]
    more = len(counts) - shown
    return ", ".join(vals) + (f" (and {more} more)" if more > 0 else "")


_SAID: set[str] = set()


def _say_once(key, message: str) -> None:
    """One line on stderr per process and key (e.g. the old-bundle fallback)."""
    import sys

    if str(key) not in _SAID:
        _SAID.add(str(key))
        print(message, file=sys.stderr)


def _lesion_size_text(res: QueryResult) -> str:
    """ "; the query's lesion covers about 3.1% of the image, the neighbours' 2.6-3.9% (...)":
    what the extent code compares, for models with an extent head ("" otherwise)."""
    areas = [n.lesion_area for n in res.neighbors if n.lesion_area is not None]
    if res.lesion_area is None or not areas:
        return ""
    shares = [n.lesion_size_share for n in res.neighbors if n.lesion_size_share is not None]
    lo, hi = min(areas), max(areas)
    span = f"{lo:.1%}" if f"{lo:.1%}" == f"{hi:.1%}" else f"{lo:.1%}–{hi:.1%}"
    return (
        f"; by the model's lesion-extent estimate the query's lesion covers about "
        f"{res.lesion_area:.1%} of the image and the neighbours' {span} (agreement in lesion "
        f"size is a median {np.median(shares):.0%} of each similarity)"
    )
