"""explain-eval for a volume model (cnn3d, slices): the 2-D measures of
retrieval.explain.trust, run on voxels.

:func:`retrieval.explain.trust.evaluate` handles both; for a volume every case's query map
is computed on the model input (1, C, D, H, W) and

* trilinearly resized to the volume's original ``(D, H, W)`` (the lesion mask's size, see
  :func:`retrieval.data.volume.read_volume_mask`) for the **pointing game** (the map's
  maximum in the lesion dilated by half a feature-volume cell along each axis, in original
  voxels: :func:`tolerance`; ``pointing_game_strict`` without) and the **mask energy**
  (the share of the map's positive mass inside the lesion; ``mask_area`` the chance level);
* trilinearly resized to the model input ``(D, H, W)`` for the rest, as 2-D maps are
  resized to the input image:

  - **deletion / insertion** curves: voxels removed (replaced by the input blurred with a
    3-D Gaussian, σ = ``trust.BLUR_FRACTION`` × each axis's length) in the map's order in
    ``trust.CURVE_STEPS`` equal steps, against a seeded random voxel order, and the
    bootstrap faithfulness verdict on the deletion gain;
  - **faithfulness correlation** on random voxel subsets, **max-sensitivity** to small
    input noise (on the sanity cases);
  - Adebayo et al.'s **model-randomisation sanity checks** (cascading and independent,
    over the blocks of ``sanity.blocks``: the heads, then every parameterised block of
    the 3-D backbone), with the 2-D verdict rule; the similarities are computed on the
    3-D maps: Spearman over all voxels, SSIM in 3-D (scikit-image's N-d SSIM, window 7
    or the largest odd size within the smallest side), HOG on the axial slices (HOG is
    2-D: the features of every slice, concatenated; :func:`retrieval.explain.sanity._hog`);
  - the data-randomisation test when asked for (the 3-D architecture retrained on
    permuted labels) and Hanawa et al.'s **neighbour tests** on the retrieved volumes.

The similarity decomposition's lesion x lesion share (lesion cells = feature voxels
whose footprint touches the mask) is reported as for images. By default only the cheap
methods run (occlusion, LIME, Kernel SHAP and the other expensive maps when named with
``--methods``: every sanity step re-explains each sanity case).
"""

from __future__ import annotations

import math

from retrieval.explain import registry

# what explain-eval measures on images and not on volumes ("" when nothing)
NOT_MEASURED = ""
# the methods explain-eval runs on a volume model unless --methods names others
DEFAULT_METHODS = [m for m in registry.METHODS if not registry.get(m).expensive]


def tolerance(geometry, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Half a feature-volume cell along (slices, rows, cols), in original voxels."""
    d, h, w = geometry.original_size
    return tuple(math.ceil(n / g / 2) for n, g in zip((d, h, w), grid, strict=True))


def annotate(report: dict) -> dict:
    """The volume additions to a report of trust.evaluate on a volume model (in place)."""
    from retrieval.explain.trust import BLUR_FRACTION, summary_line

    for m in report["methods"].values():
        m["dimensions"] = 3
        m["not_measured"] = NOT_MEASURED
        m["summary"] = summary_line(m)
    report["not_measured"] = NOT_MEASURED
    s = report["settings"]
    s["dimensions"] = 3
    s["pointing_tolerance"] = "half a feature-volume cell along each axis"
    s["maps"] = (
        "trilinearly resized to the volume's original (D, H, W) for the pointing game and "
        "mask energy, to the model input (D, H, W) for the curves and the sanity checks"
    )
    s["curve_baseline"] = f"3-D gaussian blur, sigma = {BLUR_FRACTION:g} x each axis's length"
    s["faithfulness_correlation"] = s["faithfulness_correlation"].replace("pixels", "voxels")
    s["samples"].update(
        lime=registry.VOLUME_LIME_SAMPLES,
        lime_segments=registry.VOLUME_LIME_SEGMENTS,
        occlusion_window=f"{registry.OCCLUSION_WINDOW_3D:g} x each side, stride half",
    )
    s["sanity_similarity"] = (
        "on the 3-D maps: Spearman over all voxels, 3-D SSIM, HOG on the axial slices "
        "(concatenated)"
    )
    return report


def evaluate(
    retriever, manifest_path, split="test", methods=None, max_cases=40, progress=True, **kw
):
    """The explain-eval report of a volume model: :func:`retrieval.explain.trust.evaluate`
    (same keys as for images, plus ``dimensions`` and ``not_measured``); ``kw``: its
    sanity / seed / data-randomisation / subclass arguments."""
    from retrieval.explain import trust

    return trust.evaluate(retriever, manifest_path, split, methods, max_cases, progress, **kw)
