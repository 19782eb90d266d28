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
    # float32 maps: the two sums may differ in the eighth digit
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-9)


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


# ------------------------------------------------ the Quantus metrics explain-eval adds
def test_faithfulness_correlation_agrees_with_quantus(setup):
    """Same maps, same random subsets (Quantus's draws, recorded), same blurred
    replacement: our Pearson r equals Quantus's FaithfulnessCorrelation."""
    from retrieval.explain import fidelity

    model, x, y, cam, noise, masks = setup
    heat = np.stack([cam[i] + 0.5 * noise[i] for i in range(6)])
    base = torch.stack([trust.blurred(x[i]) for i in range(6)])
    base_flat = base.reshape(6, -1).numpy()
    drawn = []

    def to_blur(arr, indices, **kwargs):
        drawn.append(np.array(indices))
        out = arr.copy()
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = base_flat[rows, indices]
        return out

    k = SIZE * SIZE // 16
    np.random.seed(3)
    theirs = quantus.FaithfulnessCorrelation(
        nr_runs=40,
        subset_size=k,
        normalise=False,
        abs=False,
        perturb_func=to_blur,
        return_aggregate=False,
        disable_warnings=True,
    )(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=heat[:, None],
        channel_first=True,
        softmax=True,
    )
    assert len(drawn) == 40
    # the model Quantus calls, not our BN-folded copy: the two agree only to float32 noise
    # (about 1e-5 in these correlations, depending on the thread count), which is not
    # what this test is about
    ours = []
    for i in range(6):
        subsets = np.stack([d[i] for d in drawn])
        ours.append(
            fidelity.faithfulness_correlation(
                lambda b, c=int(y[i]): model(b).softmax(1)[:, c],
                x[i],
                heat[i],
                base[i],
                subsets=subsets,
            )
        )
    assert np.all(np.isfinite(ours)) and np.ptp(ours) > 0.05  # not a degenerate comparison
    np.testing.assert_allclose(ours, theirs, atol=TOL)


def test_max_sensitivity_agrees_with_quantus(setup):
    """captum's sensitivity_max (what explain-eval runs) and Quantus's MaxSensitivity on
    the same explanation function and the same noise draws."""
    from retrieval.explain import fidelity

    model, x, y, cam, noise, masks = setup
    gradient = registry.get("gradient")
    samples, radius = 4, 0.3

    def explain_one(xi, cls):
        return gradient.attribute(model, xi, [cls])[0]

    ours = []
    for i in range(6):
        ours.append(
            fidelity.max_sensitivity(
                lambda xp, c=int(y[i]): explain_one(xp, c),
                x[i : i + 1],
                radius=radius,
                samples=samples,
                seed=11,
            )
        )
    # the noise our seeded perturb_func draws: one (C, S, S) field per sample
    g = torch.Generator().manual_seed(11)
    fields = (torch.rand((samples, 1, SIZE, SIZE), generator=g) * 2 - 1).numpy() * radius
    step = {"k": 0}

    def same_noise(arr, indices, **kwargs):
        out = arr + fields[step["k"]].reshape(1, -1)
        step["k"] += 1
        return out

    def explain_func(model, inputs, targets, **kwargs):
        xs = torch.as_tensor(inputs)
        return np.stack(
            [explain_one(xs[j : j + 1], int(targets[j])).numpy() for j in range(len(xs))]
        )[:, None]

    a = explain_func(model, x.numpy(), y.numpy())
    theirs = quantus.MaxSensitivity(
        nr_samples=samples,
        perturb_func=same_noise,
        normalise=False,
        abs=False,
        disable_warnings=True,
    )(
        model=model,
        x_batch=x.numpy(),
        y_batch=y.numpy(),
        a_batch=a,
        explain_func=explain_func,
        channel_first=True,
    )
    assert np.all(np.asarray(ours) > 0.01)  # the noise moves the maps
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
