import numpy as np
import pytest
import torch

from retrieval.explain import registry
from retrieval.explain.registry import ScoreTarget
from retrieval.explain.similarity import decompose, region_pairs
from retrieval.model.cells import cell_span
from retrieval.model.preprocess import Geometry

from .conftest import tiny_model


@pytest.mark.parametrize("weighting", ["saliency", "uniform"])
@pytest.mark.parametrize("image_size", [32, 64])
def test_completeness_for_random_pairs(weighting, image_size):
    model = tiny_model(image_size=image_size)
    gen = torch.Generator().manual_seed(image_size)
    x = torch.randn(8, 1, image_size, image_size, generator=gen)
    with torch.no_grad():
        out = model.run(x, weighting)
    for i, j in [(0, 1), (2, 3), (4, 5), (6, 7), (1, 6), (3, 3)]:
        dec = decompose(model, out.features[i], out.weights[i], out.features[j], out.weights[j])
        assert dec.completeness_error < 1e-4
        assert abs(dec.similarity - float(out.embedding[i] @ out.embedding[j])) < 1e-5
        # row / column sums are the query / case maps, each summing to the similarity as well
        assert abs(dec.query_map().sum() - dec.similarity) < 1e-4
        assert abs(dec.case_map().sum() - dec.similarity) < 1e-4


@pytest.mark.parametrize("weighting", ["saliency", "uniform"])
def test_registry_similarity_equals_the_decomposition_on_both_sides(weighting):
    model = tiny_model(image_size=64)
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.run(x, weighting)
    dec = decompose(model, out.features[0], out.weights[0], out.features[1], out.weights[1])
    # query side: query image with the case embedding fixed; case side: the reverse
    inputs = torch.stack([x[0], x[1]])
    target = ScoreTarget(
        torch.tensor([-1, -1]), torch.stack([out.embedding[1], out.embedding[0]]), weighting
    )
    maps = registry.get("similarity").attribute(model, inputs, target).numpy()
    np.testing.assert_allclose(maps[0], dec.query_map(), atol=1e-5)
    np.testing.assert_allclose(maps[1], dec.case_map(), atol=1e-5)
    # on a class row it is the class activation map: sums to the logit minus the bias
    c = int(out.predicted[0])
    cam = registry.get("similarity").attribute(model, x[:1], c)[0]
    expected = float(out.logits[0, c] - model.classifier.bias[c].detach())
    assert abs(float(cam.sum()) - expected) < 1e-4


@pytest.mark.parametrize("size", [(100, 160), (300, 200)])
def test_geometry_cells_tile_non_square_images(size):
    geo = Geometry(size, 64)
    grid = (4, 4)
    h, w = size
    cover = np.zeros(size, int)
    for r in range(grid[0]):
        for c in range(grid[1]):
            x0, y0, x1, y1 = geo.cell_box(r, c, grid)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            # the box is the cell's span (the pixels nearest its centre) in the original image
            (ylo, yhi), (xlo, xhi) = cell_span(r, grid[0], 64), cell_span(c, grid[1], 64)
            assert abs(x0 - xlo * w / 64) <= 1 and abs(x1 - xhi * w / 64) <= 1
            assert abs(y0 - ylo * h / 64) <= 1 and abs(y1 - yhi * h / 64) <= 1
            cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1  # every original pixel belongs to some cell


def test_matched_regions_map_back_for_images_of_different_sizes(retriever, odd_images):
    q = retriever.encode(odd_images[(100, 160)])
    c = retriever.encode(odd_images[(300, 200)])
    nb = retriever.neighbor(float(q.embedding @ c.embedding), 0)
    retriever.match_regions(q, c, nb, n_regions=3)
    assert nb.completeness_error < 1e-4
    dec = decompose(retriever.model, q.features, q.weights, c.features, c.weights)
    pairs = region_pairs(dec, 3)
    assert len(nb.matched_regions) == len(pairs) >= 1
    for region, pair in zip(nb.matched_regions, pairs, strict=True):
        for box, cells, (h, w) in (
            (region.query_box, pair.query_cells, (100, 160)),
            (region.case_box, pair.case_cells, (300, 200)),
        ):
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            # the box is the original-pixel footprint of the region's cells' bounding box
            rows, cols = np.nonzero(cells)
            gh, gw = cells.shape
            size = retriever.model.config.image_size
            xs = cell_span(cols.min(), gw, size)[0], cell_span(cols.max(), gw, size)[1]
            ys = cell_span(rows.min(), gh, size)[0], cell_span(rows.max(), gh, size)[1]
            assert abs(x0 - xs[0] * w / size) <= 1 and abs(x1 - xs[1] * w / size) <= 1
            assert abs(y0 - ys[0] * h / size) <= 1 and abs(y1 - ys[1] * h / size) <= 1
        block = dec.terms[pair.query_cells.ravel()][:, pair.case_cells.ravel()].sum()
        assert region.contribution == pytest.approx(block)
        assert region.share == pytest.approx(block / dec.similarity)
        assert region.cells == (int(pair.query_cells.sum()), int(pair.case_cells.sum()))
    assert nb.maps["similarity"]["query"].shape == (100, 160)
    assert nb.maps["similarity"]["case"].shape == (300, 200)
    # the maps' peaks sit in the cells of the largest row / column sums
    qmap = dec.query_map()
    r, col = np.unravel_index(np.argmax(qmap), qmap.shape)
    full = nb.maps["similarity"]["query"]
    y, x = np.unravel_index(np.argmax(full), full.shape)
    x0, y0, x1, y1 = q.geometry.cell_box(int(r), int(col), q.grid)  # the map peaks in that cell
    assert x0 <= x < x1 and y0 <= y < y1


def test_registry_similarity_equals_the_decomposition_with_an_extent_code():
    """A model with a lesion-extent head: both the map and the decomposition put the code's
    part of the similarity on the lesion cells, and both still sum to the similarity."""
    from retrieval.model import extent
    from retrieval.model.network import CaseNet, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(
        classes=["a", "b"],
        image_size=64,
        width=8,
        extent_weight=1.0,
        extent_knots=extent.fit_knots(np.linspace(0.0, 0.2, 50)),
    )
    model = CaseNet(cfg).eval()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.run(x)
    dec = decompose(model, out.features[0], out.weights[0], out.features[1], out.weights[1])
    assert dec.completeness_error < 1e-5 and dec.extent_term != 0.0
    target = ScoreTarget(
        torch.tensor([-1, -1]), torch.stack([out.embedding[1], out.embedding[0]]), "saliency"
    )
    maps = registry.get("similarity").attribute(model, torch.stack([x[0], x[1]]), target).numpy()
    np.testing.assert_allclose(maps[0], dec.query_map(), atol=1e-5)
    np.testing.assert_allclose(maps[1], dec.case_map(), atol=1e-5)
