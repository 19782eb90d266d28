"""similarity_score (calibrated on the index) and matched regions (blobs of cells, block sums)."""

import json
import shutil

import numpy as np
import pytest

from index import bundle
from retrieval.explain.similarity import (
    CROSS_SIDE_MIN_SHARE,
    MAX_REGION_FRACTION,
    SCORE_FILE,
    SimilarityDecomposition,
    SimilarityScale,
    calibrate_scale,
    cell_mask_share,
    lesion_cells,
    region_pairs,
    segment,
)
from retrieval.model.preprocess import Geometry


def blob(grid, centre, sigma=0.8):
    yy, xx = np.mgrid[0 : grid[0], 0 : grid[1]]
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


def decomposition(q_weight, c_weight, noise=0.0, seed=0):
    """T_ij = w_i w_j (1 + noise), normalised so that it sums to a similarity of 0.9."""
    rng = np.random.default_rng(seed)
    terms = np.outer(q_weight.ravel(), c_weight.ravel())
    terms = terms * (1 + noise * rng.standard_normal(terms.shape))
    terms *= 0.9 / terms.sum()
    return SimilarityDecomposition(terms, 0.9, q_weight.shape, c_weight.shape)


# ------------------------------------------------------------------ the score
def skewed_quantiles(seed=0):
    rng = np.random.default_rng(seed)
    pool = np.concatenate([1 - rng.exponential(1e-3, 500), 0.6 + 0.1 * rng.random(100)])
    return np.quantile(np.clip(pool, -1, 1), np.linspace(0, 1, 101))


@pytest.mark.parametrize("quantiles", [skewed_quantiles(), None])
def test_score_is_monotone_in_the_cosine_and_within_0_1(quantiles):
    scale = SimilarityScale(quantiles)
    cos = np.sort(np.concatenate([np.linspace(-1.2, 1.2, 2001), 1 - np.geomspace(1e-6, 0.5, 500)]))
    s = scale.score(cos)
    assert s.shape == cos.shape and np.all(np.isfinite(s))
    assert s.min() >= 0.0 and s.max() <= 1.0
    assert np.all(np.diff(s) >= 0)
    assert isinstance(scale.score(0.5), float)
    assert 0.0 <= scale.score(float("nan")) <= 1.0


def test_calibrated_score_spreads_close_cosines_that_the_raw_cosine_bunches():
    scale = SimilarityScale(skewed_quantiles())
    # cosines 0.9995 and 0.998 differ by 0.0015 raw; in the calibrated score by far more
    gap = scale.score(0.9995) - scale.score(0.998)
    assert gap > 0.3
    assert scale.score(1.0) == 1.0 and scale.score(0.0) == 0.0
    assert SimilarityScale(None).score(0.9995) - SimilarityScale(None).score(0.998) < 0.001


def test_calibration_pools_top_k_of_other_patients():
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((60, 8)).astype(np.float32)
    vec[1::2] = vec[0::2]  # every patient has two identical images (cosine 1 within patient)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    patients = np.repeat(np.arange(30), 2).astype(str)

    def search(q, kk):
        sims = q @ vec.T
        ids = np.argsort(-sims, axis=1)[:, :kk]
        return np.take_along_axis(sims, ids, 1), ids

    q, meta = calibrate_scale(search, vec, patients, k=5, levels=51)
    assert len(q) == 51 and np.all(np.diff(q) >= 0)
    assert q[-1] < 0.999  # the own patient's twin (cosine 1) never enters the pool
    assert meta["n_pairs"] == 60 * 5 and meta["k"] == 5
    # without patients the twins dominate the top of the pool
    q_all, _ = calibrate_scale(search, vec, np.array([""] * 60), k=5, levels=51)
    assert q_all[-1] > 0.999


def test_index_stores_its_calibration_and_neighbours_carry_scores(retriever, phantom_dir):
    assert (retriever.index_dir / SCORE_FILE).is_file() and retriever.scale.calibrated
    assert retriever.meta["similarity_score"]["n_pairs"] > 0
    case = retriever.cases.iloc[3]
    res = retriever.query(case["image"], k=6, exclude_patient=case["patient_id"])
    js = res.to_json()
    scores = [n["similarity_score"] for n in js["neighbors"]]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)  # same order as the cosines
    assert js["similarity_scale"]["calibrated"] is True
    assert f"{max(scores):.2f}" in res.explanation_text
    json.dumps(js)


def test_bundle_without_calibration_still_loads_with_a_flagged_fallback(tiny_index, tmp_path):
    from retrieval.service.retriever import CaseRetriever

    old = tmp_path / "old_index"
    shutil.copytree(tiny_index, old)
    (old / SCORE_FILE).unlink()
    meta = json.loads((old / bundle.BUNDLE_JSON).read_text())
    meta.pop("similarity_score", None)
    bundle.seal(old, meta)  # as a bundle built before the calibration existed
    r = CaseRetriever.load(old, device="cpu")
    assert not r.scale.calibrated
    res = r.query(r.cases.at[0, "image"], k=3)
    js = res.to_json()
    assert js["similarity_scale"]["calibrated"] is False
    assert "rebuild" in js["similarity_scale"]["method"]
    for n in res.neighbors:
        assert n.similarity_score == pytest.approx((1 + n.similarity) / 2)
    assert "uncalibrated" in res.explanation_text


# ------------------------------------------------------------------ regions
def test_grouped_regions_carry_more_than_single_cells_and_shares_sum_to_at_most_one():
    grid = (8, 8)
    # a lesion-like blob on each side (sigma one cell) over a faint background, noisy terms
    dec = decomposition(blob(grid, (2, 2), 1.0) + 0.005, blob(grid, (5, 2), 1.0) + 0.005, 0.1)
    assert dec.completeness_error < 1e-9
    pairs = region_pairs(dec, 3)
    cells = dec.top_pairs(3)
    carried = sum(p.share for p in pairs)
    single = sum(v for _, _, v in cells) / dec.similarity
    assert carried > 2 * single and carried >= 0.5
    assert carried <= 1.0 + 1e-9
    top = pairs[0]
    assert top.query_cells[2, 2] and top.case_cells[5, 2]  # the blobs, not the background
    # each share is its block of the decomposition
    for p in pairs:
        assert p.share == pytest.approx(cell_mask_share(dec, p.query_cells, p.case_cells))


def test_no_region_is_larger_than_the_cap_even_for_a_flat_map():
    heat = np.ones((8, 8)) + 0.01 * np.random.default_rng(1).random((8, 8))
    regions = segment(heat)
    assert regions
    assert max(r.sum() for r in regions) <= MAX_REGION_FRACTION * heat.size
    regions_union = np.any(regions, axis=0)
    assert regions_union.sum() == sum(r.sum() for r in regions)  # disjoint


def test_opposite_side_pair_is_kept_only_when_it_carries_weight():
    grid = (8, 8)
    q = blob(grid, (3, 1))  # on the left of the query
    # case: a strong blob on the left (same side) and a weaker one on the right
    dec = decomposition(q, blob(grid, (3, 1)) + 0.4 * blob(grid, (3, 6)))
    every = region_pairs(dec, 3, cross_side_min_share=0.0, min_share=0.0)
    cross = [p for p in every if p.crosses_sides]
    assert len(cross) == 1 and 0.02 < cross[0].share < CROSS_SIDE_MIN_SHARE
    share = cross[0].share
    bar = {"min_share": 0.0}
    assert any(
        p.crosses_sides for p in region_pairs(dec, 3, cross_side_min_share=share - 0.01, **bar)
    )
    kept = region_pairs(dec, 3, cross_side_min_share=share + 0.01, **bar)
    assert kept and not any(p.crosses_sides for p in kept)
    assert not kept[0].crosses_sides and kept[0].share > share
    # a cross-side match that carries most of the similarity is kept with the default bar
    heavy = region_pairs(decomposition(q, blob(grid, (3, 6))))
    assert heavy[0].crosses_sides and heavy[0].share >= CROSS_SIDE_MIN_SHARE


def test_lesion_cells_and_lesion_share():
    geo = Geometry((64, 96), 64)
    mask = np.zeros((64, 96), bool)
    mask[2:7, 50:60] = True
    cells = lesion_cells(mask, geo, (4, 4))
    # cells centred on input px 0, 16, 32, 48: x 50-60 of 96 (scale 1.5) -> column 2
    # ([36.75, 60.75)); y 2-7 of 64 -> row 0 ([0, 8.5))
    assert cells.sum() == 1 and cells[0, 2]
    grid = (4, 4)
    dec = decomposition(blob(grid, (0, 2), 0.5), blob(grid, (0, 2), 0.5))
    full = np.ones(grid, bool)
    assert cell_mask_share(dec, full, full) == pytest.approx(1.0)
    # the blobs' peak cells hold most of it: far above an even spread (1/16 x 1/16)
    assert cell_mask_share(dec, cells, cells) > max(0.4, 10 * cells.mean() ** 2)


def test_small_pairs_after_the_first_are_left_out():
    grid = (8, 8)
    # query: one blob; case: a strong blob and a faint far one that still forms a region
    dec = decomposition(blob(grid, (3, 3)), blob(grid, (3, 3)) + 0.3 * blob(grid, (7, 7), 0.4))
    every = region_pairs(dec, 3, min_share=0.0)
    assert len(every) == 2 and every[1].share < 0.2 < every[0].share
    small = every[1].share
    assert len(region_pairs(dec, 3, min_share=small - 0.01)) == 2
    shown = region_pairs(dec, 3, min_share=small + 0.01)
    assert len(shown) == 1 and shown[0].share == every[0].share
    # the largest pair is shown however small it is
    assert len(region_pairs(dec, 3, min_share=1.0)) == 1
