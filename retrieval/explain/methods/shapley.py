"""Shapley-value family: all captum.

deeplift_shap   captum ``DeepLiftShap`` (Lundberg & Lee 2017, Deep SHAP): DeepLIFT on
                the canonical model averaged over ``SHAP_BASELINES`` reference images;
                signed, summed over channels.
gradient_shap   captum ``GradientShap`` (expected gradients): ``GRADIENT_SHAP_SAMPLES``
                draws of a reference and a point on the straight path to the
                input, gradient × (x − reference); signed, summed over channels.
kernel_shap     captum ``KernelShap`` on the same SLIC superpixels as LIME
                (``Lime.feature_mask``), ``KERNEL_SHAP_SAMPLES`` coalitions,
                hidden superpixels set to the dataset mean; signed superpixel
                Shapley estimates. Like LIME, every target of an image reuses
                one set of forwards (``SharedForward``, same seed).

The references: the dataset-mean image (zeros in normalised space, the IG and
DeepLIFT baseline) plus ``SHAP_BASELINES - 1`` Gaussian-noise images around it
(σ = ``SHAP_NOISE`` in normalised units, i.e. half the dataset's intensity
spread; seeded), the "Gaussian baseline" of Sturmfels et al. (Distill 2020):
a single black or mean image hides everything that looks like it, a
distribution of references does not.
"""

from __future__ import annotations

import torch

from retrieval.explain.methods import SEED, channel_sum, seeded

SHAP_BASELINES = 8
SHAP_NOISE = 0.5
GRADIENT_SHAP_SAMPLES = 16
KERNEL_SHAP_SAMPLES = 128


def shap_baselines(inputs: torch.Tensor, n: int = SHAP_BASELINES, seed: int = SEED):
    """(n, C, S, S): the mean image and n-1 seeded Gaussian-noise references."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n - 1, *inputs.shape[1:]), generator=g) * SHAP_NOISE
    return torch.cat([torch.zeros(1, *inputs.shape[1:]), noise]).to(inputs)


def _chunks(n_rows: int, per_row: int):
    from retrieval.explain.registry import FORWARD_BATCH

    step = max(1, FORWARD_BATCH // max(1, per_row))
    return [slice(i, min(n_rows, i + step)) for i in range(0, n_rows, step)]


class DeepLiftShap:
    name, expensive = "deeplift_shap", True

    def __init__(self, baselines: int = SHAP_BASELINES, seed: int = SEED):
        self.baselines, self.seed = baselines, seed

    def attribute(self, model, inputs, target):
        from captum.attr import DeepLiftShap as DLS

        from retrieval.explain.methods.gradients import _canonical_prepared
        from retrieval.explain.registry import _grad_mode

        p = _canonical_prepared(model, inputs, target, self.name)
        refs = shap_baselines(inputs, self.baselines, self.seed)
        out = []
        with _grad_mode():
            for sl in _chunks(len(inputs), 2 * self.baselines):
                args = tuple(a[sl] for a in p.args)
                out.append(
                    DLS(p.forward).attribute(
                        inputs[sl], baselines=refs, additional_forward_args=args
                    )
                )
        return channel_sum(torch.cat(out))


class GradientShap:
    name, expensive = "gradient_shap", True

    def __init__(self, samples: int = GRADIENT_SHAP_SAMPLES, seed: int = SEED):
        self.samples, self.seed = samples, seed

    @seeded
    def attribute(self, model, inputs, target):
        from captum.attr import GradientShap as GS

        from retrieval.explain.registry import _grad_mode, _prepare, inference_model

        model = inference_model(model)
        p = _prepare(model, inputs, target)
        refs = shap_baselines(inputs, SHAP_BASELINES, self.seed)
        out = []
        with _grad_mode():
            for sl in _chunks(len(inputs), self.samples):
                args = None if p.args is None else tuple(a[sl] for a in p.args)
                out.append(
                    GS(p.forward).attribute(
                        inputs[sl],
                        baselines=refs,
                        n_samples=self.samples,
                        stdevs=0.0,
                        additional_forward_args=args,
                    )
                )
        return channel_sum(torch.cat(out))


class KernelShap:
    name, expensive = "kernel_shap", True

    def __init__(self, samples: int = KERNEL_SHAP_SAMPLES, segments: int | None = None, seed=SEED):
        self.samples, self.segments, self.seed = samples, segments, seed

    def attribute(self, model, inputs, target):
        from captum.attr import KernelShap as KS

        from retrieval.explain import registry

        model = registry.inference_model(model)
        segments = self.segments or registry.LIME_SEGMENTS
        fmask = registry.Lime(segments=segments).feature_mask(model, inputs)

        def one(forward, x, row):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # the same coalitions for every target of an image
                attr = KS(forward).attribute(
                    x,
                    baselines=0.0,
                    feature_mask=fmask[row : row + 1],
                    n_samples=self.samples,
                    perturbations_per_eval=min(self.samples, registry.FORWARD_BATCH),
                )
            return attr[:, 0]

        with torch.no_grad():
            return registry._per_image(model, inputs, target, one).detach()
