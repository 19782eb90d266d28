"""Exact spatial decomposition of the cosine similarity between two embeddings.

With pooled features p = Σ_i w_i F_i and embedding e = P p / ‖P p‖ (P linear),

    sim(q, c) = e_q · e_c = Σ_i Σ_j  w^q_i w^c_j (P F^q_i) · (P F^c_j) / (‖P p_q‖ ‖P p_c‖)
                          = Σ_i Σ_j T_ij

so the (h·w) × (h'·w') matrix T of query-location × case-location terms sums
to the similarity exactly (completeness, up to float rounding). Its row sums
give a query map, its column sums a case map, and its largest entries the
matched regions. No library does this; it follows from the model's design.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrieval.model.network import CaseNet


@dataclass
class SimilarityDecomposition:
    terms: np.ndarray  # (hq*wq, hc*wc) float64, sums to `similarity`
    similarity: float  # e_q · e_c from the embeddings themselves
    query_grid: tuple[int, int]
    case_grid: tuple[int, int]

    @property
    def completeness_error(self) -> float:
        return abs(float(self.terms.sum()) - self.similarity)

    def query_map(self) -> np.ndarray:
        return self.terms.sum(axis=1).reshape(self.query_grid)

    def case_map(self) -> np.ndarray:
        return self.terms.sum(axis=0).reshape(self.case_grid)

    def top_pairs(self, n: int = 3) -> list[tuple[tuple[int, int], tuple[int, int], float]]:
        """Largest positive terms, each query cell and each case cell used once (greedy)."""
        order = np.argsort(self.terms, axis=None)[::-1]
        used_q, used_c, out = set(), set(), []
        wc = self.case_grid[1]
        wq = self.query_grid[1]
        for flat in order:
            qi, cj = divmod(int(flat), self.terms.shape[1])
            val = float(self.terms[qi, cj])
            if val <= 0 or len(out) >= n:
                break
            if qi in used_q or cj in used_c:
                continue
            used_q.add(qi)
            used_c.add(cj)
            out.append(((qi // wq, qi % wq), (cj // wc, cj % wc), val))
        return out


def decompose(
    model: CaseNet,
    q_features: torch.Tensor,
    q_weights: torch.Tensor,
    c_features: torch.Tensor,
    c_weights: torch.Tensor,
) -> SimilarityDecomposition:
    """Decompose sim(e_q, e_c) for one pair: features (C, h, w), weights (h, w) summing to 1."""
    with torch.no_grad():
        P = model.projection.weight.double()  # (D, C)
        qf, cf = q_features.double(), c_features.double()
        qz = torch.einsum("dc,chw->hwd", P, qf).reshape(-1, P.shape[0])  # (hq*wq, D)
        cz = torch.einsum("dc,chw->hwd", P, cf).reshape(-1, P.shape[0])
        qw, cw = q_weights.double().reshape(-1), c_weights.double().reshape(-1)
        qp, cp = (qw[:, None] * qz).sum(0), (cw[:, None] * cz).sum(0)
        norm = qp.norm().clamp_min(1e-12) * cp.norm().clamp_min(1e-12)
        terms = (qw[:, None] * qz) @ (cw[:, None] * cz).T / norm
        eq = model.embed_features(q_features[None].float(), q_weights[None].float())[0]
        ec = model.embed_features(c_features[None].float(), c_weights[None].float())[0]
        sim = float((eq.double() * ec.double()).sum())
    return SimilarityDecomposition(
        terms.cpu().numpy(), sim, tuple(q_features.shape[-2:]), tuple(c_features.shape[-2:])
    )
