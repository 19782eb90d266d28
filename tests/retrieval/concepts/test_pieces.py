"""CAV fitting, TCAV scores and their test, concept refinement: fast checks on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.concepts import cav, tcav
from retrieval.concepts.store import parse_weights, refine
from retrieval.errors import CasebaseError
from retrieval.model.network import CaseNet, ModelConfig


def test_fit_cav_points_towards_the_concept():
    rng = np.random.default_rng(0)
    d = 40
    axis = np.zeros(d, np.float32)
    axis[3] = 1.0
    pos = rng.normal(size=(30, d)).astype(np.float32) + 3 * axis
    neg = rng.normal(size=(30, d)).astype(np.float32)
    c = cav.fit_cav(pos, neg, seed=0)
    assert c.accuracy >= 0.8  # 20 held-out samples; the Bayes accuracy is about 0.93
    assert np.isclose(np.linalg.norm(c.direction), 1.0, atol=1e-5)
    assert c.direction[3] > 0.5  # along the concept's axis, pointing towards it


def test_runs_and_the_set_level_test():
    """A concept shifting the activations along the class's gradient: every score 1, effect
    about the shift; a random set of the pool: no evidence; the opposite concept: score 0,
    as significant (two-sided); the prediction-interval p is exact under the null."""
    rng = np.random.default_rng(1)
    d, n_pool, n_set = 20, 150, 24
    grads = rng.normal(size=(40, d)) * 0.2
    grads[:, 0] += 1.0  # every input's score rises along axis 0
    pool = rng.normal(size=(n_pool, d))
    concept = rng.normal(size=(n_set, d)) + 2.0 * np.eye(d)[0]
    anti = rng.normal(size=(n_set, d)) - 2.0 * np.eye(d)[0]
    a = np.concatenate([concept, anti, pool])
    proj = {("classes", "c"): grads @ a.T}
    gram = a @ a.T
    rows_c, rows_a = np.arange(n_set), np.arange(n_set, 2 * n_set)
    rows_pool = np.arange(2 * n_set, 2 * n_set + n_pool)
    runs = 10
    conc = tcav._runs(proj, gram, rows_c, rows_pool, runs, seed=0)
    neg = tcav._runs(proj, gram, rows_a, rows_pool, runs, seed=0)
    null = []
    for j in range(20):
        perm = np.random.default_rng(j).permutation(rows_pool)
        null.append(tcav._runs(proj, gram, perm[:n_set], perm[n_set:], runs, seed=0))
    key = ("classes", "c")
    ns = np.array([x["scores"][key].mean() for x in null])
    ne = np.array([x["effects"][key].mean() for x in null])
    t = tcav._test(conc["scores"][key], conc["effects"][key], ns, ne)
    assert t.tcav_score > 0.95 and 1.5 < t.effect < 2.5  # mean g·shift = 1 x 2
    assert t.p_value_effect < 1e-4 and t.p_value_score < 0.05
    # held-out halves separate along the direction (Bayes accuracy ~0.84); random sets do not
    assert conc["accuracy"].mean() > 0.65
    assert np.mean([x["accuracy"].mean() for x in null]) < 0.6
    t_neg = tcav._test(neg["scores"][key], neg["effects"][key], ns, ne)
    assert (
        t_neg.tcav_score == 0.0
        and t_neg.p_value_effect < 1e-4
        and t_neg.to_json()["rises"] is False
    )
    # a random set against the other random sets: no evidence
    t_null = tcav._test(null[0]["scores"][key], null[0]["effects"][key], ns[1:], ne[1:])
    assert t_null.p_value_effect > 0.01
    # the prediction-interval p is uniform under the null: 5% of Gaussian draws below 0.05
    draws = np.random.default_rng(3).normal(size=(4000, 21))
    ps = np.array([tcav._predictive_p(x[0], x[1:]) for x in draws])
    assert abs((ps < 0.05).mean() - 0.05) < 0.012


def test_layer_gradients_match_finite_differences():
    """∇ at a block of (centred class logit, similarity to a class mean) agrees with finite
    differences."""
    torch.manual_seed(0)
    model = CaseNet(ModelConfig(classes=["a", "b", "c"], image_size=32, width=8)).eval()
    x = torch.randn(3, 1, 32, 32)
    idx = 2
    mean = np.random.default_rng(0).normal(size=128).astype(np.float32)
    gl, gs = cav.target_gradients(model, idx, x, 1, mean, "uniform")
    feats = model.backbone.features
    with torch.no_grad():
        a = feats[: idx + 1](x)
        v = torch.randn_like(a[0])
        v /= v.norm()
        eps = 1e-3

        def targets(act):
            f = feats[idx + 1 :](act)
            z = model.classifier(f.mean(dim=(2, 3)))
            logit = z[:, 1] - z.mean(dim=1)  # the centred logit
            h, w = f.shape[-2:]
            wts = f.new_full((f.shape[0], h, w), 1.0 / (h * w))
            sim = model.embed_features(f, wts) @ torch.as_tensor(mean)
            return logit, sim

        lp, sp = targets(a + eps * v)
        lm, sm = targets(a - eps * v)
    fd_l = ((lp - lm) / (2 * eps)).numpy()
    fd_s = ((sp - sm) / (2 * eps)).numpy()
    vv = v.flatten().numpy()
    np.testing.assert_allclose(gl @ vv, fd_l, rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(gs @ vv, fd_s, rtol=2e-2, atol=1e-4)


def test_last_block_is_refused_and_candidates_are_earlier():
    model = CaseNet(ModelConfig(classes=["a", "b"], image_size=32, width=8))
    last = len(model.backbone.features) - 1
    with pytest.raises(CasebaseError, match="last block"):
        cav.layer_index(model, f"backbone.features.{last}")
    with pytest.raises(CasebaseError, match="not a block"):
        cav.layer_index(model, "fc")
    assert all(cav.layer_index(model, n) < last for n in cav.candidate_layers(model))
    assert tcav.DEFAULT_LAYER in cav.candidate_layers(model)


def test_refine_scales_the_concept_component():
    rng = np.random.default_rng(2)
    q = rng.normal(size=16)
    q /= np.linalg.norm(q)
    v = rng.normal(size=16)
    v /= np.linalg.norm(v)
    dirs = {"ruler": v.astype(np.float32)}
    removed = refine(q, dirs, {"ruler": -1.0})
    assert abs(removed @ v) < 1e-5 and np.isclose(np.linalg.norm(removed), 1.0, atol=1e-5)
    np.testing.assert_allclose(refine(q, dirs, {"ruler": 0.0}), q, atol=1e-6)
    more = refine(q, dirs, {"ruler": 1.0})
    assert abs(more @ v) > abs(q @ v)
    # a second direction along the first adds nothing after orthogonalisation
    both = refine(q, {**dirs, "same": v.astype(np.float32)}, {"ruler": -1.0, "same": 3.0})
    np.testing.assert_allclose(both, removed, atol=1e-5)
    with pytest.raises(CasebaseError, match="unknown concept 'x'"):
        refine(q, dirs, {"x": 1.0})
    with pytest.raises(CasebaseError, match=r"\[-5, 5\]"):
        refine(q, dirs, {"ruler": 9.0})
    assert parse_weights(["ruler=-1", "b=0.5"]) == {"ruler": -1.0, "b": 0.5}
    for bad in ("ruler", "ruler=x", "=1", "a b=1"):
        with pytest.raises(CasebaseError):
            parse_weights([bad])
