"""Our trust metrics against Quantus's implementations on the same maps (the referee).

Same maps, model, masks and perturbation for both; the differences are only in
conventions, which the test pins down:

* pointing game: Quantus's ``PointingGame`` has no tolerance and scores a hit when
  any tied maximum is on the mask; ours (tolerance 0) scores the share of tied
  maxima that hit. On maps without ties (continuous values) both are 0/1 and
  must agree exactly.
* mask energy: Quantus's ``RelevanceMassAccuracy`` (mass in the mask over the
  total) on non-negative maps (Grad-CAM) equals ours (positive mass only).
* deletion: Quantus's ``PixelFlipping`` with ``features_in_step`` = 1/16 of the
  pixels and our blurred copy as the replacement gives the predicted-class
  softmax after each step; ours is the same curve with the unperturbed point
  first. Agreement to 1e-5 (float32 forwards in different batch shapes).
"""

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")

from retrieval.explain import registry, trust  # noqa: E402

from .conftest import tiny_model  # noqa: E402

SIZE = 32
TOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(image_size=SIZE)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 1, SIZE, SIZE, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    cam = registry.get("gradcam").attribute(model, x, y.tolist()).numpy()
    noise = torch.rand(6, SIZE, SIZE, generator=g).numpy()  # signed-free, tie-free
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    masks = np.stack([((yy - 8 - 3 * i) ** 2 + (xx - 20 + 2 * i) ** 2) <= 36 for i in range(6)])
    return model, x, y, cam, noise, masks


def test_pointing_game_agrees_with_quantus(setup):
    model, x, y, cam, noise, masks = setup
    # plant the peak of half the noise maps on the mask so both outcomes occur
    planted = noise.copy()
    for i in range(0, 6, 2):
        r, c = np.argwhere(masks[i])[0]
        planted[i, r, c] = 2.0
    theirs = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True)(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=planted[:, None],
        s_batch=masks[:, None].astype(np.float32),
        channel_first=True,
    )
    ours = [trust.pointing_game(planted[i], masks[i], 0) for i in range(6)]
    assert set(ours) == {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(theirs, float), ours)


def test_mask_energy_agrees_with_relevance_mass_accuracy(setup):
    model, x, y, cam, noise, masks = setup
    full = np.stack([cam[i] + 1e-3 * noise[i] for i in range(6)])  # non-negative, no zero total
    theirs = quantus.RelevanceMassAccuracy(normalise=False, abs=False, disable_warnings=True)(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=full[:, None],
        s_batch=masks[:, None].astype(np.float32),
        channel_first=True,
    )
    ours = [trust.mask_energy(full[i], masks[i]) for i in range(6)]
    np.testing.assert_allclose(theirs, ours, atol=1e-9)


def test_deletion_curve_agrees_with_pixel_flipping(setup):
    model, x, y, cam, noise, masks = setup
    fast = registry.inference_model(model)
    heat = np.stack([cam[i] + 1e-4 * noise[i] for i in range(6)])  # a strict order, no ties
    base = torch.stack([trust.blurred(x[i]) for i in range(6)])
    base_flat = base.reshape(6, -1).numpy()

    def to_blur(arr, indices, **kwargs):
        out = arr.copy()
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = base_flat[rows, indices]
        return out

    step = SIZE * SIZE // trust.CURVE_STEPS
    theirs = quantus.PixelFlipping(
        features_in_step=step,
        normalise=False,
        abs=False,
        perturb_func=to_blur,
        disable_warnings=True,
    )(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=heat[:, None],
        channel_first=True,
        softmax=True,
    )
    rng = np.random.default_rng(0)
    for i in range(6):
        ranks = trust.pixel_order_ranks(heat[i], rng)
        d, _ = trust.perturbation_curves(fast, x[i], int(y[i]), ranks, base[i])
        np.testing.assert_allclose(d[1:], theirs[i], atol=TOL)
        with torch.no_grad():
            p0 = float(model(x[i : i + 1]).softmax(1)[0, y[i]])
        # our AUC = trapezoid over [unperturbed, Quantus's curve]
        assert trust.auc(d) == pytest.approx(trust.auc([p0, *theirs[i]]), abs=TOL)
