"""Adebayo et al.'s randomisation checks, Hanawa et al.'s neighbour tests, the faithfulness
verdict and explain-eval's sanity output."""

import numpy as np
import pytest
import torch

from retrieval.explain import registry, sanity, trust

from .conftest import explain_eval_with_sanity, tiny_model


def test_blocks_run_from_the_top_down_and_randomise_only_what_they_name():
    model = tiny_model()
    b = sanity.blocks(model)
    assert b[0] == ("logits", ["classifier", "projection"])
    assert [label for label, _ in b[1:]] == [
        f"block {i}" for i in reversed(range(len(model.backbone.features)))
    ]
    top = b[1][1][0]
    rnd = sanity.randomized(model, [top], seed=0)
    before, after = model.state_dict(), rnd.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(top) for k in changed)
    again = sanity.randomized(model, [top], seed=0).state_dict()
    assert all(torch.equal(after[k], again[k]) for k in after)  # seeded


def test_map_similarity_identical_constant_and_unrelated_maps():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    same = sanity.map_similarity(a, a)
    assert all(v == pytest.approx(1.0) for v in same.values())
    flip = sanity.map_similarity(a, -a)
    assert flip["spearman"] == pytest.approx(-1.0) and flip["spearman_abs"] == pytest.approx(1.0)
    const = sanity.map_similarity(a, np.zeros_like(a))
    assert const["spearman"] == 0.0 and const["spearman_abs"] == 0.0 and const["hog"] == 0.0
    other = sanity.map_similarity(a, rng.random((32, 32)))
    assert abs(other["spearman"]) < 0.2 and abs(other["hog"]) < 0.5
    assert sanity.is_constant(np.zeros((4, 4))) and not sanity.is_constant(a)


class _Fixed:
    def __init__(self, fn):
        self.fn = fn


def test_a_constant_map_fails_and_a_model_blind_map_fails():
    model = tiny_model()
    cases = [
        {"x": torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]

    def qmap(mdl, name, case):
        x = case["x"][None]
        if name == "empty":
            return np.zeros((32, 32))
        if name == "image":
            return case["x"][0].numpy()  # ignores the model entirely
        target = registry.ScoreTarget.for_classes([0], 16)
        return registry.get("gradient").attribute(mdl, x, target)[0].numpy()

    out = sanity.sanity_checks(
        model, cases, ["empty", "image", "gradient"], qmap, seeds=(0, 1, 2), progress=False
    )
    assert out["empty"]["verdict"] == "fail" and "constant" in out["empty"]["reason"]
    assert out["image"]["verdict"] == "fail"
    assert out["image"]["full_randomization"]["spearman_abs"] == pytest.approx(1.0)
    g = out["gradient"]
    assert g["seeds"] == [0, 1, 2] and len(g["cascading"]["ssim"]) == len(g["blocks"])
    assert all(np.isfinite(g["cascading"]["spearman_abs_sd"]))


def test_faithfulness_needs_a_ci_that_excludes_the_random_order():
    assert trust.faithfulness_verdict([0.05, 0.04, 0.06, 0.05, 0.07])[0] == "faithful"
    # a model no deletion moves: every gain a hair above 0, CI above 0, but no effect
    verdict, (lo, _) = trust.faithfulness_verdict([1e-4, 2e-4, 1.5e-4, 1e-4, 3e-4])
    assert lo > 0 and verdict == "not faithful on this data"
    verdict, (lo, hi) = trust.faithfulness_verdict([0.05, -0.06, 0.02, -0.03, 0.01, 0.0])
    assert verdict == "not faithful on this data" and lo < 0 < hi
    assert np.isnan(trust.bootstrap_ci([0.1])[0])  # one case proves nothing


def test_hanawa_tests_on_controlled_embeddings():
    """Pool: 2 classes x 2 subclasses; the 'trained' embedding encodes class and subclass,
    the 'random' one is a fixed random projection of noise."""
    rng = np.random.default_rng(0)
    centres = {(c, s): rng.standard_normal(8) for c in "ab" for s in "xy"}
    keys = [(c, s) for c in "ab" for s in "xy" for _ in range(5)]
    feats = np.stack([centres[k] * 3 + 0.3 * rng.standard_normal(8) for k in keys])
    pool = torch.tensor(feats, dtype=torch.float32)
    queries = pool[::5] + 0.1
    proj = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(100, 8, generator=torch.Generator().manual_seed(2))

    def trained(t):
        return torch.nn.functional.normalize(t, dim=1)

    def random(t):
        idx = (t.abs().sum(1) * 1000).long() % 100
        return torch.nn.functional.normalize(noise[idx] @ proj, dim=1)

    q_keys = keys[::5]
    out = sanity.neighbour_tests(
        trained,
        random,
        queries,
        pool,
        [k[0] for k in q_keys],
        [k[0] for k in keys],
        [k[0] for k in q_keys],
        [k[1] for k in q_keys],
        [k[1] for k in keys],
    )
    assert out["identical_class"]["rate"] == 1.0 and out["identical_class"]["verdict"] == "pass"
    assert out["identical_subclass"]["rate"] == 1.0
    assert out["identical_subclass"]["chance"] == pytest.approx(0.5)
    # 4 of 4 queries agreeing at chance 0.5: one-sided binomial p = 0.5**4, not yet a pass
    assert out["identical_subclass"]["p_value"] == pytest.approx(0.0625)
    assert out["identical_subclass"]["verdict"] == "fail"
    assert out["model_randomization"]["verdict"] == "pass"
    labels_q, labels_p = [k[0] for k in q_keys], [k[0] for k in keys]
    blind = sanity.neighbour_tests(trained, trained, queries, pool, labels_q, labels_p, labels_q)
    assert blind["model_randomization"]["spearman"] == pytest.approx(1.0)
    assert blind["model_randomization"]["verdict"] == "fail"


def test_explain_eval_command_writes_sanity_curves_and_a_plot(
    tiny_index, phantom_dir, tmp_path, capsys
):
    png = tmp_path / "sanity.png"
    report = explain_eval_with_sanity(
        tiny_index, phantom_dir / "manifest.csv", "gradcam,guided_backprop", png, capsys
    )
    for name in ("gradcam", "guided_backprop"):
        m = report["methods"][name]
        assert m["sanity_check"] in ("pass", "fail")
        assert set(m["sanity"]["cascading"]) >= {"spearman_abs", "spearman", "ssim", "hog"}
        assert m["faithfulness"] in ("faithful", "not faithful on this data")
        assert m["family"] in ("CAM family", "gradients")
    assert report["neighbour_tests"]["identical_class"]["rate"] >= 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_similarity_curves_are_scored_on_the_similarity_they_explain():
    """Issue 22: deletion / insertion for `similarity` measure the weighted mean cosine to the
    neighbours (the quantity its map decomposes), not the class probability."""
    model = tiny_model()
    fast = registry.inference_model(model)
    g = torch.Generator().manual_seed(3)
    x, nbrs = torch.randn(1, 1, 32, 32, generator=g), torch.randn(3, 1, 32, 32, generator=g)
    score = trust._similarity_score(fast, x, nbrs, "saliency")
    with torch.no_grad():
        eq, ec = model.run(x).embedding[0], model.run(nbrs).embedding
        sims = ec @ eq
        w = sims.clamp_min(0) / sims.clamp_min(0).sum()
        expected = float((w * sims).sum())
        assert float(score(x)[0]) == pytest.approx(expected, abs=1e-5)
    ranks = trust.pixel_order_ranks(
        np.random.default_rng(0).random((32, 32)), np.random.default_rng(1)
    )
    d, ins = trust.perturbation_curves(fast, x[0], 0, ranks, torch.zeros_like(x[0]), score=score)
    assert d[0] == pytest.approx(expected, abs=1e-5) and ins[-1] == pytest.approx(
        expected, abs=1e-5
    )
    assert trust._similarity_score(fast, x, None, "saliency") is None


def test_permuted_label_model_trains_a_fresh_copy_on_shuffled_labels():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, 32, 32, generator=g), torch.tensor([0, 1, 2] * 4)
    net, info = sanity.permuted_label_model(model, x, y, epochs=2, seed=0, progress=False)
    assert info["epochs"] == 2 and info["n"] == 12
    assert 0.0 <= info["train_accuracy_on_permuted_labels"] <= 1.0
    assert not net.training and type(net) is type(model)
    assert not torch.equal(net.classifier.weight, model.classifier.weight)
