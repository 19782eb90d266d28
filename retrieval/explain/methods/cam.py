"""CAM family beyond Grad-CAM: Grad-CAM++ and Guided Grad-CAM.

gradcam_plus_plus   Chattopadhay et al. 2018 on ``model.cam_layer``: the layer's
                    activations and gradients from captum
                    (``compute_layer_gradients_and_eval``), then the closed-form
                    weights of the paper as pytorch-grad-cam implements them
                    (α = g² / (2g² + Σ_ij A · g³ + 1e-6), w_k = Σ_ij α ReLU(g)), ReLU of the
                    weighted sum, bilinearly upsampled cell-centred. The test checks it against
                    pytorch-grad-cam's GradCAMPlusPlus.
guided_gradcam      Selvaraju et al. 2017 as captum's ``GuidedGradCam`` computes it
                    (captum ``GuidedBackprop`` times captum ``LayerGradCam``, ReLU),
                    with Grad-CAM upsampled cell-centred (``upsample_cells``) rather
                    than by captum's half-cell-off interpolation; on the canonical
                    model (see ``canonical``); |attribution|, max over channels.
"""

from __future__ import annotations

import torch

from retrieval.explain.methods import channel_max_abs


class GradCAMPlusPlus:
    name, expensive = "gradcam_plus_plus", False

    def __init__(self, upsample: bool = True):
        self.upsample = upsample

    def attribute(self, model, inputs, target):
        from captum._utils.gradient import compute_layer_gradients_and_eval

        from retrieval.explain.registry import _grad_mode, _prepare, cam_map, inference_model

        model = inference_model(model)
        p = _prepare(model, inputs, target)
        with _grad_mode():
            grads, acts = compute_layer_gradients_and_eval(
                p.forward,
                model.cam_layer,
                inputs,
                additional_forward_args=p.args,
            )
        g, a = grads[0].detach(), acts[0].detach()
        g2, g3 = g.pow(2), g.pow(3)
        spatial = tuple(range(2, a.ndim))  # (h, w), or (d, h, w) for a volume model
        denom = 2 * g2 + a.sum(dim=spatial, keepdim=True) * g3
        alpha = torch.where(g != 0, g2 / (denom + 1e-6), 0.0)  # eps as pytorch-grad-cam
        weights = (alpha * g.clamp_min(0)).sum(dim=spatial, keepdim=True)
        cam = (weights * a).sum(dim=1, keepdim=True).clamp_min(0)
        return cam_map(cam, inputs, self.upsample)


class GuidedGradCAM:
    name, expensive = "guided_gradcam", False

    def attribute(self, model, inputs, target):
        from captum.attr import GuidedBackprop, LayerGradCam

        from retrieval.explain.methods.canonical import canonical_model
        from retrieval.explain.registry import _grad_mode, _prepare, cam_map

        canon = canonical_model(model)
        p = _prepare(canon, inputs, target)
        if p.target is None:
            from retrieval.errors import CasebaseError

            raise CasebaseError("guided_gradcam explains a class logit or a similarity")
        with _grad_mode():
            guided = GuidedBackprop(p.forward).attribute(inputs, additional_forward_args=p.args)
            cam = LayerGradCam(p.forward, canon.cam_layer).attribute(
                inputs, additional_forward_args=p.args, relu_attributions=True
            )
        # captum's GuidedGradCam, with Grad-CAM upsampled cell-centred (``upsample_cells``)
        return channel_max_abs(guided * cam_map(cam.detach(), inputs, True)[:, None])
