"""Our Grad-CAM (closed form and registry/captum) equals pytorch-grad-cam's GradCAM.

pytorch-grad-cam ReLUs the raw CAM, min-max scales it per image (x - min) / (1e-7 + max),
resizes it to the input with cv2 (bilinear) and min-max scales the result again
(aggregate_multi_layers). We apply exactly that post-processing
(``scale_cam_image``) to our raw (h, w) CAMs and compare like with like.
"""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from retrieval.explain import registry

from .conftest import tiny_model


def _their_postprocessing(raw: np.ndarray, size: int) -> np.ndarray:
    return scale_cam_image(scale_cam_image(np.maximum(raw, 0), (size, size)))


@pytest.mark.parametrize("channels,size", [(1, 64), (3, 32)])
def test_gradcam_matches_pytorch_grad_cam(channels, size):
    model = tiny_model(
        image_size=size, in_channels=channels, mean=[0.5] * channels, std=[0.25] * channels
    )
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(channels))
    with torch.no_grad():
        out = model.run(x)
    # explain the runner-up class too, so a non-argmax target is covered
    classes = [int(out.predicted[0]), int(out.logits[1].argsort()[-2]), int(out.predicted[2])]
    with GradCAM(model=model, target_layers=[model.target_layer]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    assert theirs.shape == (3, size, size)

    closed = model.gradcam(out.features, torch.tensor(classes)).detach().numpy()
    ours = registry.GradCAM(upsample=False).attribute(model, x, classes).numpy()
    np.testing.assert_allclose(ours, closed, atol=1e-5, rtol=1e-4)
    for raw in (closed, ours):
        np.testing.assert_allclose(_their_postprocessing(raw, size), theirs, atol=1e-5)

    # the registry's default output is that raw CAM upsampled cell-centred: pytorch-grad-cam
    # (cv2) and captum's interpolate both put cell i half a cell past its receptive field
    from retrieval.model.cells import upsample_cells

    full = registry.get("gradcam").attribute(model, x, classes)
    torch.testing.assert_close(
        full, upsample_cells(torch.from_numpy(closed), (size, size)), atol=1e-5, rtol=1e-4
    )
    from captum.attr import LayerAttribution

    half_off = LayerAttribution.interpolate(
        torch.from_numpy(closed)[:, None], (size, size), interpolate_mode="bilinear"
    )[:, 0]
    assert not torch.allclose(full, half_off, atol=1e-3)
