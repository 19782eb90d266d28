"""Gradient family beyond saliency / SmoothGrad / IG: all captum.

input_x_gradient    captum ``InputXGradient`` (Shrikumar et al. 2016): x ⊙ ∂score/∂x
                    on the normalised input (so relative to the dataset-mean
                    image); signed, summed over channels.
guided_backprop     captum ``GuidedBackprop`` (Springenberg et al. 2015) on the
                    canonical model; |attribution|, max over channels.
deconvolution       captum ``Deconvolution`` (Zeiler & Fergus 2014) on the
                    canonical model; |attribution|, max over channels.
deeplift            captum ``DeepLift`` (Shrikumar et al. 2017, rescale rule) on the
                    canonical model from the dataset-mean image (zeros in
                    normalised space, the IG baseline); signed, summed over
                    channels (sums to score(x) − score(baseline)).

Guided backprop and deconvolution only change how ReLUs pass gradients back;
Adebayo et al. (2018) showed their maps barely depend on the weights above the
first layers, and explain-eval's sanity check is there to show it on our models.
"""

from __future__ import annotations

import torch

from retrieval.explain.methods import channel_max_abs, channel_sum


def _canonical_prepared(model, inputs, target, name):
    from retrieval.errors import CasebaseError
    from retrieval.explain.methods.canonical import canonical_model
    from retrieval.explain.registry import _prepare

    canon = canonical_model(model)
    p = _prepare(canon, inputs, target)
    if p.target is None:  # hooks need an nn.Module: a ScoreHead over the canonical model
        raise CasebaseError(f"{name} explains a class logit or a similarity")
    return p


class InputXGradient:
    name, expensive = "input_x_gradient", False

    def attribute(self, model, inputs, target):
        from captum.attr import InputXGradient as IXG

        from retrieval.explain.registry import _grad_mode, _prepare, inference_model

        model = inference_model(model)
        p = _prepare(model, inputs, target)
        with _grad_mode():
            attr = IXG(p.forward).attribute(inputs, additional_forward_args=p.args)
        return channel_sum(attr)


class _ModifiedRelu:
    expensive = False
    captum_class = ""

    def attribute(self, model, inputs, target):
        import captum.attr

        from retrieval.explain.registry import _grad_mode

        p = _canonical_prepared(model, inputs, target, self.name)
        with _grad_mode():
            attr = getattr(captum.attr, self.captum_class)(p.forward).attribute(
                inputs, additional_forward_args=p.args
            )
        return channel_max_abs(attr)


class GuidedBackprop(_ModifiedRelu):
    name, captum_class = "guided_backprop", "GuidedBackprop"


class Deconvolution(_ModifiedRelu):
    name, captum_class = "deconvolution", "Deconvolution"


class DeepLift:
    name, expensive = "deeplift", False

    def attribute(self, model, inputs, target):
        from captum.attr import DeepLift as DL

        from retrieval.explain.registry import _grad_mode

        p = _canonical_prepared(model, inputs, target, self.name)
        with _grad_mode():
            attr = DL(p.forward).attribute(
                inputs, baselines=torch.zeros_like(inputs), additional_forward_args=p.args
            )
        return channel_sum(attr)
