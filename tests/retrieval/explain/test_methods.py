import numpy as np
import pytest
import torch

from retrieval.errors import CasebaseError
from retrieval.explain import explain_query, registry
from retrieval.explain.methods import shapley
from retrieval.explain.pipeline import pair_batch, weighted_query_map
from retrieval.explain.registry import ScoreTarget

from .conftest import tiny_model

ALL = list(registry.METHODS)


@pytest.fixture
def cheap(monkeypatch):
    """Fewer samples / windows: the same code paths at a fraction of the cost."""
    for e in (
        registry.Occlusion(fraction=0.25),
        registry.Lime(samples=16, segments=8),
        registry.SmoothGrad(samples=3),
        registry.IntegratedGradients(steps=4),
        shapley.KernelShap(samples=16, segments=8),
        shapley.DeepLiftShap(baselines=2),
        shapley.GradientShap(samples=2),
    ):
        monkeypatch.setitem(registry.REGISTRY, e.name, e)


def _check_map(m, shape):
    assert isinstance(m, np.ndarray) and m.dtype == np.float32
    assert m.shape == shape
    assert np.isfinite(m).all()


def test_every_method_gives_finite_maps_at_original_size(retriever, odd_images):
    """Default settings, all seven methods in one query; expensive ones on the top neighbour only."""
    res = retriever.query(odd_images[(100, 160)], k=3, explain=ALL)
    assert set(res.maps) == set(ALL) and "explain" in res.timings
    for method in ALL:
        _check_map(res.maps[method], (100, 160))
        explained = [n for n in res.neighbors if method in n.maps]
        assert len(explained) == (1 if method in registry.EXPENSIVE else len(res.neighbors))
        assert explained[0] is res.neighbors[0]  # the top neighbour always
        for n in explained:
            _check_map(n.maps[method]["query"], (100, 160))
            _check_map(n.maps[method]["case"], tuple(n.original_size))


def test_all_methods_on_a_tall_image(retriever, odd_images, cheap):
    res = retriever.query(odd_images[(300, 200)], k=2, explain=ALL)
    for m in ALL:
        _check_map(res.maps[m], (300, 200))
        _check_map(res.neighbors[0].maps[m]["query"], (300, 200))


def test_unknown_method_is_a_user_error_naming_the_valid_ones(retriever, odd_images):
    with pytest.raises(CasebaseError) as err:
        retriever.query(odd_images[(100, 160)], k=2, explain=["gradcam", "deep_lift"])
    assert "deep_lift" in str(err.value) and "integrated_gradients" in str(err.value)


def test_expensive_neighbors_can_be_raised(retriever, odd_images, cheap):
    res = retriever.query(odd_images[(100, 160)], k=2)
    ctxs = retriever._neighbor_contexts(res.neighbors)
    q = retriever.encode(odd_images[(100, 160)])
    explain_query(retriever, q, res.neighbors, ctxs, ["occlusion"], res, expensive_neighbors=3)
    assert all("occlusion" in n.maps for n in res.neighbors)


def test_similarity_query_map_is_the_weighted_mean_of_neighbour_maps(retriever, odd_images):
    res = retriever.query(odd_images[(100, 160)], k=3, explain=["similarity"])
    maps = [n.maps["similarity"]["query"] for n in res.neighbors]
    expected = weighted_query_map(maps, [n.similarity for n in res.neighbors])
    np.testing.assert_allclose(res.maps["similarity"], expected, rtol=1e-5, atol=1e-7)
    assert (
        weighted_query_map([np.ones((2, 2)), np.zeros((2, 2))], [-1.0, -2.0]).tolist()
        == [[0.5, 0.5]] * 2
    )


def test_stochastic_methods_are_reproducible(retriever, odd_images, cheap):
    a = retriever.query(odd_images[(100, 160)], k=1, explain=["smoothgrad", "lime"])
    b = retriever.query(odd_images[(100, 160)], k=1, explain=["smoothgrad", "lime"])
    for m in ("smoothgrad", "lime"):
        np.testing.assert_array_equal(a.maps[m], b.maps[m])
        np.testing.assert_array_equal(
            a.neighbors[0].maps[m]["case"], b.neighbors[0].maps[m]["case"]
        )


@pytest.mark.parametrize(
    "method",
    [
        "gradcam",
        "gradient",
        "integrated_gradients",
        "occlusion",
        "lime",
        "guided_backprop",
        "deeplift",
        "deeplift_shap",
        "kernel_shap",
        "lrp",
        "gradcam_plus_plus",
    ],
)
def test_batched_pair_explanation_equals_one_row_at_a_time(retriever, odd_images, method, cheap):
    """One call for [query (class), query (sim), case (sim)] = three separate calls."""
    q = retriever.encode(odd_images[(100, 160)])
    c = retriever.encode(odd_images[(300, 200)])
    inputs, target = pair_batch(q, [c], retriever.weighting)
    e = registry.get(method)
    together = e.attribute(retriever.model, inputs, target)
    for i in range(3):
        row = ScoreTarget(target.classes[i : i + 1], target.others[i : i + 1], target.weighting)
        alone = e.attribute(retriever.model, inputs[i : i + 1], row)
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-4)


def test_similarity_target_explains_the_similarity_score():
    """Occlusion on a similarity row = drop of emb(x)·other when a window is hidden."""
    model = tiny_model(image_size=32)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    other = torch.nn.functional.normalize(torch.randn(1, 16), dim=1)
    occ = registry.Occlusion(fraction=0.25).attribute(model, x, ScoreTarget.for_similarity(other))
    with torch.no_grad():
        full = float(model.run(x).embedding @ other[0])
        hidden = x.clone()
        hidden[..., 0:8, 0:8] = 0.0  # window 8, stride 4: only window (0, 0) covers pixel (0, 0)
        drop = full - float(model.run(hidden).embedding @ other[0])
    assert float(occ[0, 0, 0]) == pytest.approx(drop, abs=1e-5)
