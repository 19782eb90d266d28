"""A query on an index whose model has a lesion-extent head: what it says about lesion size,
and that its decompositions (stored and recomputed) still sum to the similarity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index.region_index import LESION_FILE


@pytest.fixture(scope="module")
def retriever(tiny_index):
    from retrieval.service.retriever import CaseRetriever

    return CaseRetriever.load(tiny_index, device="cpu")


def _query(retriever, row: int = 3, **kw):
    case = retriever.cases.iloc[row]
    return retriever.query(case["image"], k=5, exclude_patient=case["patient_id"], **kw)


def test_index_of_a_masked_phantom_has_an_extent_head_and_stores_its_fractions(retriever):
    model = retriever.model
    assert model.has_extent  # the phantom's manifest has lesion masks: on by default
    assert retriever.index.index.d == model.config.output_dim == model.config.embedding_dim + 2
    ri = retriever.region_index
    assert (retriever.index_dir / LESION_FILE).is_file()
    assert ri.lesion.shape == ri.weights.shape
    assert np.all((ri.lesion >= 0) & (ri.lesion <= 1))
    # a stored case's vector rebuilt from its cells and fractions is the indexed vector
    v = retriever.stored_embedding(5)
    assert v.shape == (model.config.output_dim,)
    assert np.allclose(v, retriever.index.index.reconstruct(5), atol=1e-4)


def test_query_reports_lesion_areas_and_the_size_share(retriever):
    res = _query(retriever)
    js = json.loads(json.dumps(res.to_json()))
    assert 0.0 < js["lesion_area"] < 1.0
    for n in js["neighbors"]:
        assert 0.0 < n["lesion_area"] < 1.0
        # the extent term is c^2 cos(dt) / (1 + c^2) <= 1/2 of a similarity of at least it
        assert -1.0 <= n["lesion_size_share"] <= 1.0
        assert n["lesion_size_share"] != 0.0
    assert "lesion covers about" in res.explanation_text
    assert f"{js['lesion_area']:.1%}" in res.explanation_text


def test_stored_and_recomputed_decompositions_agree_and_sum_to_the_similarity(retriever):
    stored = _query(retriever)
    for nb in stored.neighbors:
        assert nb.completeness_error < 1e-4
    # the same neighbours decomposed from their images (no region index)
    ri, retriever.region_index = retriever.region_index, None
    try:
        fresh = _query(retriever)
    finally:
        retriever.region_index = ri
    for a, b in zip(stored.neighbors, fresh.neighbors, strict=True):
        assert a.case_id == b.case_id
        assert b.completeness_error < 1e-4
        assert abs(a.lesion_size_share - b.lesion_size_share) < 1e-3
        assert abs(a.lesion_area - b.lesion_area) < 1e-3
        assert [r.query_box for r in a.matched_regions] == [r.query_box for r in b.matched_regions]
