"""The J. Imaging 2020 review's attribution methods beyond the first seven, one module per family.

* ``cam``: ``gradcam_plus_plus``, ``guided_gradcam``
* ``gradients``: ``input_x_gradient``, ``guided_backprop``, ``deconvolution``, ``deeplift``
* ``shapley``: ``deeplift_shap``, ``gradient_shap``, ``kernel_shap``
* ``relevance``: ``lrp`` (zennit)

They follow the protocol of :mod:`retrieval.explain.registry` (``attribute(model,
inputs, target)``, class and similarity rows mixed in one batch) and import the
registry's glue only when they run, so the registry can import them at its end.
:func:`retrieval.explain.methods.canonical.canonical_model` gives the modified-
backpropagation methods (guided backprop, deconvolution, DeepLIFT, LRP) the
model they need: BatchNorm folded, one non-inplace ``nn.ReLU`` module per use,
residual additions as a ``Sum`` module.
"""

from __future__ import annotations

import torch

SEED = 0

# how the app and the report group the methods (DESIGN.md names)
FAMILIES: dict[str, tuple[str, ...]] = {
    "CAM family": ("gradcam", "gradcam_plus_plus", "guided_gradcam", "similarity"),
    "gradients": (
        "gradient",
        "smoothgrad",
        "integrated_gradients",
        "input_x_gradient",
        "guided_backprop",
        "deconvolution",
        "deeplift",
    ),
    "perturbation": ("occlusion", "lime"),
    "Shapley": ("deeplift_shap", "gradient_shap", "kernel_shap"),
    "relevance": ("lrp",),
}


def family_of(name: str) -> str:
    for fam, names in FAMILIES.items():
        if name in names:
            return fam
    return "other"


def seeded(fn):
    """Run a stochastic method under ``self.seed`` without touching the global RNG."""

    def wrapper(self, *a, **kw):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(self, "seed", SEED))
            return fn(self, *a, **kw)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def channel_sum(attr: torch.Tensor) -> torch.Tensor:
    """Signed attribution summed over channels (keeps completeness of additive methods)."""
    return attr.detach().sum(dim=1)


def channel_max_abs(attr: torch.Tensor) -> torch.Tensor:
    return attr.detach().abs().amax(dim=1)
