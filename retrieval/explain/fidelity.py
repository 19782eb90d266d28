"""Two Quantus metrics that tell a user something the pointing game and deletion do not.

* **max-sensitivity** (Yeh et al. 2019; Quantus ``MaxSensitivity``): how much the map
  changes when the input gets a little noise the model should not care about,
  max over ``SENSITIVITY_SAMPLES`` draws of ``||map(x + δ) − map(x)||_F / ||map(x)||_F``
  with δ uniform in [−r, r] per pixel (r = ``SENSITIVITY_RADIUS`` in the model's
  normalised input units, i.e. a tenth of a standard deviation of the training
  images). Lower is better: 0 means the noise leaves the map as is, 1 means it
  moves as far as the map is large. Computed by captum's ``sensitivity_max``
  (captum is already a runtime dependency); maps are compared at input resolution.
* **faithfulness correlation** (Bhatt et al. 2020; Quantus ``FaithfulnessCorrelation``):
  ``FAITHCORR_RUNS`` random pixel subsets (each ``FAITHCORR_FRACTION`` of the
  image) are replaced by the same Gaussian-blurred copy the deletion curve uses;
  the Pearson correlation, over subsets, between the map's summed attribution on
  the subset and the drop in the predicted-class probability it causes. Near 1:
  the map's values say how much each region matters; near 0: they do not (a map
  can order pixels well for deletion yet carry meaningless magnitudes, and the
  other way round). Hand-written (captum has no such metric; its ``infidelity``
  is a different quantity): a batch of forwards.

Quantus is the referee, not a runtime dependency: tests/retrieval/explain/
test_quantus_referee.py computes both with Quantus on the same maps, inputs and
perturbations and requires agreement to 1e-5. Quantus's explain-function
interface (model, x, y) cannot express our similarity targets, and it would add
a large dependency tree to every install for two short computations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

SENSITIVITY_RADIUS = 0.1
SENSITIVITY_SAMPLES = 3
FAITHCORR_RUNS = 64
FAITHCORR_FRACTION = 1 / 16


def uniform_noise(radius: float, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """captum perturb_func: x + U(−radius, radius), seeded (reproducible per call)."""

    def perturb(inputs: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.rand(inputs.shape, generator=g, dtype=inputs.dtype) * 2 - 1
        return inputs + radius * noise.to(inputs.device)

    return perturb


def max_sensitivity(
    explain: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    radius: float = SENSITIVITY_RADIUS,
    samples: int = SENSITIVITY_SAMPLES,
    seed: int = 0,
) -> float:
    """captum's ``sensitivity_max`` of ``explain`` ((1, C, S, S) -> (S, S) map) at x (1, C, S, S)
    (a volume: (1, C, D, H, W) -> (D, H, W)).

    ``explain`` is called once per perturbed copy (the registry's maps are per query)."""
    from captum.metrics import sensitivity_max

    def batch_explain(inputs) -> torch.Tensor:
        if isinstance(inputs, tuple):  # captum passes the unperturbed input as a 1-tuple
            (inputs,) = inputs
        maps = [explain(inputs[i : i + 1]).float() for i in range(len(inputs))]
        return (torch.stack(maps),)  # captum compares explanations as tuples

    s = sensitivity_max(
        batch_explain,
        x,
        perturb_func=uniform_noise(radius, seed),
        n_perturb_samples=samples,
        max_examples_per_batch=samples,
    )
    return float(s[0])


@torch.no_grad()
def faithfulness_correlation(
    score: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    heat: np.ndarray,
    baseline: torch.Tensor,
    runs: int = FAITHCORR_RUNS,
    fraction: float = FAITHCORR_FRACTION,
    seed: int = 0,
    batch: int = 64,
    subsets: np.ndarray | None = None,
) -> float:
    """Pearson r over ``runs`` random subsets between the map's sum on the subset and the
    score drop when the subset is replaced by ``baseline``.

    ``score(batch (n, C, S, S)) -> (n,)``; x and baseline (C, S, S); heat (S, S) at input
    resolution (a volume: x and baseline (C, D, H, W), heat (D, H, W), subsets of voxels);
    ``subsets`` (runs, k) flat pixel indices replace the seeded draw. NaN when either side
    is constant (no variation to correlate)."""
    spatial = tuple(x.shape[1:])
    n_pix = int(np.prod(spatial))
    k = max(1, int(round(fraction * n_pix)))
    if subsets is None:
        rng = np.random.default_rng(seed)
        subsets = np.stack([rng.choice(n_pix, k, replace=False) for _ in range(runs)])
    runs = len(subsets)
    flat_heat = np.nan_to_num(np.asarray(heat, np.float64)).ravel()
    attr_sums = flat_heat[subsets].sum(1)
    masks = torch.zeros(runs, n_pix, dtype=torch.bool)
    masks[torch.arange(runs)[:, None], torch.from_numpy(subsets)] = True
    masks = masks.view(runs, 1, *spatial).to(x.device)
    p0 = float(score(x[None])[0])
    drops = []
    for chunk in masks.split(batch):
        perturbed = torch.where(chunk, baseline[None], x[None])
        drops.append(p0 - score(perturbed).float().cpu())
    drops = torch.cat(drops).numpy().astype(np.float64)
    if attr_sums.std() < 1e-12 or drops.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(attr_sums, drops)[0, 1])
