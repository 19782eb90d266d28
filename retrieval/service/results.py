"""Typed query results and their JSON form (keys are the DESIGN.md contract)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _coord(v) -> str:
    f = float(v)
    return str(int(round(f))) if abs(f - round(f)) < 1e-9 else f"{f:g}"


def box_ranges(box) -> str:
    """'x 10–39, y 12–43' of a box [x0, y0, x1, y1]; 'x 10–39, y 12–43, z 2–4' of a volume's
    [x0, y0, z0, x1, y1, z1]: the first and last pixel / voxel / slice, both inclusive (last =
    end - 1), as people read a range. Boxes themselves (JSON, the region input) stay
    end-exclusive; this is only their human-readable form."""
    n = len(box) // 2
    return ", ".join(
        f"{c} {_coord(box[a])}–{_coord(float(box[n + a]) - 1)}" for a, c in enumerate("xyz"[:n])
    )


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]
    # conformal prediction sets (retrieval/service/conformal.py); None: the index has none
    set: list[str] | None = None  # the classifier's set, most probable first
    set_coverage: float | None = None  # its target coverage
    knn_set: list[str] | None = None  # the neighbour vote's set at the same coverage
    calibrated_probabilities: dict[str, float] | None = None  # temperature-scaled
    set_group: str | None = None  # Mondrian group whose calibration made the sets
    set_note: str = ""  # why there is no set, or how it was made
    temperature: float | None = None  # the index's temperature (calibrated_probabilities)
    # why the set holds every class whatever the image (too few calibration cases), or None
    set_uninformative: str | None = None
    n_calibration: int | None = None  # calibration cases behind the classifier's set

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]

    @property
    def calibrated_confidence(self) -> float:
        return (self.calibrated_probabilities or self.probabilities)[self.label]

    @property
    def confidence_text(self) -> str:
        """The headline number, saying which it is: the sentences and the CLI's probabilities
        line must show the same (calibrated when the index has a temperature)."""
        if self.calibrated_probabilities is None:
            return f"{self.confidence:.2f}"
        return f"{self.calibrated_confidence:.2f} calibrated"

    def set_json(self) -> dict:
        return {
            "set": None if self.set is None else list(self.set),
            "set_coverage": self.set_coverage,
            "knn_set": None if self.knn_set is None else list(self.knn_set),
            "calibrated_probabilities": None
            if self.calibrated_probabilities is None
            else {k: float(v) for k, v in self.calibrated_probabilities.items()},
            "set_group": self.set_group,
            "set_note": self.set_note,
            "temperature": self.temperature,
            "set_informative": None if self.set is None else self.set_uninformative is None,
            "set_uninformative_reason": self.set_uninformative,
            "n_calibration": self.n_calibration,
        }


@dataclass
class OODResult:
    score: float
    flag: bool
    threshold: float


@dataclass
class MatchedRegion:
    query_box: list[int]  # [x0, y0, x1, y1] in the query's original pixels
    case_box: list[int]  # same, in the neighbour's original pixels
    contribution: float  # Σ of the decomposition's terms between the two regions' cells
    share: float  # contribution / similarity
    crosses_sides: bool = False  # query and case regions on opposite sides of their images
    cells: tuple[int, int] = (1, 1)  # feature-map cells in the query / case region


@dataclass
class Neighbor:
    case_id: str
    label: str
    similarity: float  # raw cosine of the embeddings
    attributes: dict[str, str]
    patient_id: str
    image: str
    row: int  # position in the index
    matched_regions: list[MatchedRegion] = field(default_factory=list)
    maps: dict[str, dict[str, np.ndarray]] = field(
        default_factory=dict
    )  # method -> {"query","case"}
    completeness_error: float | None = None
    original_size: tuple[int, int] | None = None
    similarity_score: float | None = None  # in [0, 1], calibrated on the index (SimilarityScale)
    region_score: float | None = None  # region query: MaxSim of the box's cells (region_index)
    # models with an extent head (retrieval.model.extent), else None: the neighbour's predicted
    # lesion area as a share of its image, and the share of the similarity that is agreement
    # in lesion size (the extent code's term)
    lesion_area: float | None = None
    lesion_size_share: float | None = None


@dataclass
class SelfMatch:
    """The query is an indexed case itself (retrieval/service/self_match.py)."""

    case_id: str
    reason: str  # "same case id", "identical pixels", "the same picture (...)"
    similarity: float | None  # its cosine to the query (None when matched by case id)
    excluded: bool = False  # left out of the neighbours (query(..., exclude_self=True))

    def to_json(self) -> dict:
        return {
            "case_id": self.case_id,
            "reason": self.reason,
            "similarity": None if self.similarity is None else float(self.similarity),
            "excluded": bool(self.excluded),
        }


@dataclass
class QueryResult:
    prediction: Prediction
    knn_vote: dict[str, float]
    ood: OODResult
    neighbors: list[Neighbor]
    explanation_text: str
    maps: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # method -> (H, W) float32, original size
    trust: dict[str, dict] = field(default_factory=dict)  # method -> measured trust (explain-eval)
    original_size: tuple[int, int] = (0, 0)
    timings: dict[str, float] = field(default_factory=dict)
    similarity_scale: dict = field(default_factory=dict)  # {"calibrated": bool, "method": str}
    self_match: SelfMatch | None = None  # the query is an indexed case itself
    # refinements (retrieval/service/refine.py): the box asked, the cells' box searched, a note
    # (e.g. widened to one cell), and the like/unlike feedback applied
    region: list[int] | None = None
    region_searched: list[int] | None = None
    region_note: str = ""
    feedback: dict | None = None
    concepts: dict[str, float] | None = None  # concept weights the query was moved by
    # class maps explain logit(c) - logit(reference_class) (--reference-class); None: logit(c)
    reference_class: str | None = None
    lesion_area: float | None = None  # the query's predicted lesion area (extent head), share

    @property
    def contrast_note(self) -> str:
        """One line on what the class maps explain, when they are contrasted ("" otherwise)."""
        ref, label = self.reference_class, self.prediction.label
        if ref is None or label == ref:
            return ""
        return f"The class maps explain why {label} rather than {ref} (--reference-class)."

    @property
    def outcome(self) -> str:
        """What a user can act on: answer (one label), ambiguous (several), unknown (OOD)."""
        if self.ood.flag:
            return "unknown"
        if self.prediction.set is None:
            return "uncalibrated"
        return "answer" if len(self.prediction.set) == 1 else "ambiguous"

    def to_json(self, map_paths: dict[str, str] | None = None) -> dict:
        return {
            "prediction": {
                "label": self.prediction.label,
                "probabilities": {k: float(v) for k, v in self.prediction.probabilities.items()},
                **self.prediction.set_json(),
                "outcome": self.outcome,
            },
            "knn_vote": {k: float(v) for k, v in self.knn_vote.items()},
            "ood": {
                "score": float(self.ood.score),
                "flag": bool(self.ood.flag),
                "threshold": float(self.ood.threshold),
            },
            "neighbors": [
                {
                    "case_id": n.case_id,
                    "label": n.label,
                    "similarity": float(n.similarity),
                    "similarity_score": None
                    if n.similarity_score is None
                    else float(n.similarity_score),
                    **({} if n.region_score is None else {"region_score": float(n.region_score)}),
                    **(
                        {}
                        if n.lesion_area is None
                        else {
                            "lesion_area": float(n.lesion_area),
                            "lesion_size_share": float(n.lesion_size_share or 0.0),
                        }
                    ),
                    "attributes": dict(n.attributes),
                    "matched_regions": [
                        {
                            "query_box": r.query_box,
                            "case_box": r.case_box,
                            "contribution": float(r.contribution),
                            "share": float(r.share),
                            "crosses_sides": bool(r.crosses_sides),
                            "cells": list(r.cells),
                        }
                        for r in n.matched_regions
                    ],
                }
                for n in self.neighbors
            ],
            "explanation_text": self.explanation_text,
            "maps": dict(map_paths or {}),
            "trust": self.trust,
            "image_size": list(self.original_size),
            **({} if self.lesion_area is None else {"lesion_area": float(self.lesion_area)}),
            "similarity_scale": dict(self.similarity_scale),
            "self_match": None if self.self_match is None else self.self_match.to_json(),
            **self._refine_json(),
        }

    def _refine_json(self) -> dict:
        out: dict = {}
        if self.region is not None:
            out["region"] = list(self.region)
            out["region_searched"] = list(self.region_searched or self.region)
            if self.region_note:
                out["region_note"] = self.region_note
        if self.feedback is not None:
            out["feedback"] = dict(self.feedback)
        if self.concepts:
            out["concepts"] = dict(self.concepts)
        out["reference_class"] = self.reference_class
        return out
