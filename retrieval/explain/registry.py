"""Every explanation method behind one protocol, modelled on captum's ``attribute()``.

    explainer = registry.get("occlusion")
    maps = explainer.attribute(model, inputs, target)      # (B, S, S) or (B, h, w)

``model`` is always the CaseNet, ``inputs`` a normalised (B, C, S, S) batch and
``target`` says which scalar per row is explained:

* a class index (``int``), or one per row (sequence / (B,) tensor): the class
  logit (what the query's maps explain: the predicted class);
* a :class:`ScoreTarget`: per row either a class logit or the *similarity*
  ``model.run(x, weighting).embedding · other`` to a fixed other embedding
  (what a neighbour's maps explain, on the query image with the case's
  embedding fixed and on the case image with the query's embedding fixed).
  Class rows and similarity rows mix freely in one batch, so one call of one
  method explains the query and every neighbour pair in one pass;
* any callable ``x -> (B,)`` score (it must not depend on per-row state).

Internally every target becomes a :class:`ScoreHead` (a small ``nn.Module``
whose output is that per-row scalar) and the per-row data travel as captum
``additional_forward_args``, so captum expands them correctly for noise
samples, integration steps and occlusion windows.

Methods (captum for all it implements):

===================== ======================================================
gradcam               captum ``LayerGradCam`` on ``model.cam_layer`` (ReLU),
                      bilinearly upsampled to the input size with each cell
                      at its receptive field's centre (``upsample_cells``).
                      On a class logit at the last block
                      (every 2-D backbone) it equals the closed-form
                      ``model.gradcam`` (tests: 1e-5, and against
                      pytorch-grad-cam); the cnn3d's ``cam_layer`` is the
                      block where its stride-8 grid starts (see
                      ``Compact3DBackbone.cam_index``). On a similarity it is
                      Grad-CAM of the similarity score.
gradient              captum ``Saliency``: |∂score/∂x|, max over channels.
smoothgrad            captum ``NoiseTunnel(Saliency)``: mean |∂score/∂x| over
                      ``SMOOTHGRAD_SAMPLES`` copies with Gaussian noise of
                      σ = 15 % of the input's value range (Smilkov et al. 2017:
                      10–20 %), max over channels.
integrated_gradients  captum ``IntegratedGradients`` from the dataset-mean
                      image (zeros in normalised space), Gauss–Legendre,
                      ``IG_STEPS`` steps; |attribution|, max over channels.
occlusion             captum ``Occlusion``: a window of 1/6 of the side slid
                      with a stride of half the window (12 × 12 positions at
                      any input size), replaced by the dataset mean; signed
                      (positive = the score drops when the region is hidden).
lime                  captum ``Lime`` on scikit-image SLIC superpixels
                      (``LIME_SEGMENTS`` asked for), ``LIME_SAMPLES``
                      perturbations, hidden superpixels set to the dataset
                      mean, weighted ridge surrogate (alpha 1, as the original
                      LIME package); signed superpixel coefficients.
similarity            the exact decomposition (retrieval.explain.similarity):
                      on a similarity row the query-side row sums
                      w_i (P F_i)·e_other / ‖P p‖, which sum to the similarity;
                      on a class row the class activation map
                      W_c·F_ij / hw, which sums to the logit minus its bias.
                      Needs no gradient and no extra forward.
===================== ======================================================

The rest of the J. Imaging 2020 review's table lives in retrieval.explain.methods
(one module per family; each documents its captum / zennit call): ``cam``
(gradcam_plus_plus, guided_gradcam), ``gradients`` (input_x_gradient,
guided_backprop, deconvolution, deeplift), ``shapley`` (deeplift_shap,
gradient_shap, kernel_shap) and ``relevance`` (lrp, zennit EpsilonPlusFlat).
Guided backprop, deconvolution, DeepLIFT and LRP run on
``methods.canonical.canonical_model`` (BatchNorm folded, one non-inplace ReLU
module per use, residual additions as a Sum module); the trained model and
network.py are untouched.

Sample counts, chosen for the budget of a query on 2 CPU cores (all seven
methods under 15 s for a 224-px model with 5 neighbours, expensive methods on
the query and its top neighbour only) and checked on the trained phantom model
(6 test cases, 128 px):

* ``SMOOTHGRAD_SAMPLES = 16`` (forward + backward each): the map's Spearman
  correlation with a 128-sample map is 0.97 (0.985 at 32 samples, for twice
  the cost).
* ``IG_STEPS = 16`` Gauss–Legendre nodes: the completeness gap
  |Σ attribution − (score(x) − score(baseline))| / |score change| is 0.7 % on
  average (max 2.4 %); a 16-step trapezoid Riemann sum leaves 6.5 %, captum's
  default is 50 steps.
* ``LIME_SAMPLES = 96`` on ``LIME_SEGMENTS = 48`` requested SLIC superpixels
  (SLIC returns ~32–36 on the phantom films): about three samples per
  interpretable feature for the weighted ridge fit. LIME stays noisy at any
  affordable count: the map's Spearman correlation with a 384-sample map is
  0.51 at 96 samples, 0.59 at 192 and 0.40 at 48.
* occlusion is 145 forwards per image at any input size (12 × 12 windows of
  side/6, captum adding a last one flush with the edge, plus the unoccluded
  image). A side/8 window (15 × 15, 226 forwards) cost 6.2 s of the 11.9 s
  that all seven methods took on 2 quiet cores at 224 px; side/6 cost 4.3 s
  of 10.3 s, and the window still fits inside the phantom's lesions
  (diameter 14–26 % of the side).

Cost per query (one image explained for the query's class, and the query + the
case for each explained neighbour pair): gradcam and gradient 1 forward +
backward per image, similarity none beyond the query's pass, smoothgrad and
integrated_gradients 16 forward + backward, lime 96 forwards, occlusion 145.
Perturbation methods evaluate an image once for all its targets
(``SharedForward``), and every method runs on a copy of the model with its
Conv + BatchNorm pairs folded (``inference_model``, a third less CPU).

Each count is an argument of its explainer class, so a caller who can afford
more (a GPU) can ask for more. Stochastic methods run under a fixed seed
(``SEED``) so the same query gives the same map.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from retrieval.errors import CasebaseError
from retrieval.model.cells import upsample_cells

SEED = 0
SMOOTHGRAD_SAMPLES = 16
SMOOTHGRAD_NOISE = 0.15
IG_STEPS = 16
LIME_SAMPLES = 96
LIME_SEGMENTS = 48
# a volume's supervoxels: 256 asked of 3-D SLIC (~160 made on the CT phantom), one sample per
# segment; chosen by bench/volume_methods.py's sweep (64 supervoxels are far coarser than a
# lesion, 512 double the cost)
VOLUME_LIME_SEGMENTS = 256
VOLUME_LIME_SAMPLES = 256
OCCLUSION_WINDOW = 1 / 6
OCCLUSION_WINDOW_3D = 1 / 4  # of each side of a volume
FORWARD_BATCH = 64  # images per forward pass inside perturbation / path methods


# ---------------------------------------------------------------- targets
@dataclass
class ScoreTarget:
    """Per-row scalar to explain: class logit where ``classes[i] >= 0``, else the
    similarity ``embedding(x_i) · others[i]`` under ``weighting``."""

    classes: Tensor  # (B,) long; -1 marks a similarity row
    others: Tensor  # (B, D) float; ignored on class rows
    weighting: str = "saliency"

    @classmethod
    def for_classes(
        cls, classes, embedding_dim: int, weighting: str = "saliency", device=None
    ) -> ScoreTarget:
        c = torch.as_tensor(classes, dtype=torch.long, device=device).reshape(-1)
        return cls(c, torch.zeros(len(c), embedding_dim, device=device), weighting)

    @classmethod
    def for_similarity(cls, others: Tensor, weighting: str = "saliency") -> ScoreTarget:
        others = torch.as_tensor(others).float()
        if others.ndim == 1:
            others = others[None]
        return cls(
            torch.full((len(others),), -1, dtype=torch.long, device=others.device),
            others,
            weighting,
        )

    def to(self, device) -> ScoreTarget:
        return ScoreTarget(self.classes.to(device), self.others.to(device), self.weighting)

    def expand(self, n: int) -> ScoreTarget:
        """Broadcast a one-row target to n rows."""
        if len(self.classes) == n:
            return self
        if len(self.classes) != 1:
            raise ValueError(f"target has {len(self.classes)} rows for {n} inputs")
        return ScoreTarget(
            self.classes.expand(n).clone(), self.others.expand(n, -1).clone(), self.weighting
        )


def explained_logits(model: nn.Module, logits: Tensor) -> Tensor:
    """The class scores explanations explain: the logits, or, when the model has a reference
    class (``model.explain_reference``, set by CaseRetriever: a lesion-free class such as
    "normal"), every other class's logit minus the reference's: "why c rather than normal".

    Why: a class a model can tell by the absence of the others' findings has nothing at its
    lesion to show in its own logit's Grad-CAM; contrasted with the lesion-free class, the
    difference is the lesion (bench/volume_cam_target.py). The reference's own column is left
    as its logit (a normal case is explained by its own score, not by zero)."""
    ref = getattr(model, "explain_reference", None)
    if ref is None:
        return logits
    out = logits - logits[:, ref : ref + 1]
    out[:, ref] = logits[:, ref]
    return out


def explained_class_weights(model: nn.Module, classes: Tensor) -> Tensor:
    """The classifier rows matching ``explained_logits``: W_c - W_ref (W_ref for the reference)."""
    w = model.classifier.weight
    rows = w[classes.clamp_min(0)]
    ref = getattr(model, "explain_reference", None)
    if ref is None:
        return rows
    return torch.where((classes != ref)[:, None], rows - w[ref][None], rows)


class ScoreHead(nn.Module):
    """Wraps the CaseNet so its output is one scalar per row (captum's target=None)."""

    def __init__(self, model: nn.Module, weighting: str = "saliency"):
        super().__init__()
        self.model = model
        self.weighting = weighting

    def forward(self, x: Tensor, classes: Tensor, others: Tensor) -> Tensor:
        out = self.model.run(x, self.weighting)
        logits = explained_logits(self.model, out.logits)
        logit = logits.gather(1, classes.clamp_min(0)[:, None])[:, 0]
        sim = (out.embedding * others.to(out.embedding.dtype)).sum(1)
        return torch.where(classes >= 0, logit, sim)


Target = int | Sequence[int] | Tensor | ScoreTarget | Callable[[Tensor], Tensor]


@dataclass
class _Prepared:
    forward: Callable
    args: tuple | None
    target: ScoreTarget | None


def _prepare(model: nn.Module, inputs: Tensor, target: Target) -> _Prepared:
    if callable(target) and not isinstance(target, ScoreTarget | Tensor):
        return _Prepared(target, None, None)
    if not isinstance(target, ScoreTarget):
        target = ScoreTarget.for_classes(target, model.config.output_dim, device=inputs.device)
    target = target.expand(len(inputs)).to(inputs.device)
    return _Prepared(ScoreHead(model, target.weighting), (target.classes, target.others), target)


# ---------------------------------------------------------------- protocol
@runtime_checkable
class Explainer(Protocol):
    """One explanation method. ``expensive`` methods cost tens to hundreds of
    forwards per image and are run on fewer neighbours by default."""

    name: str
    expensive: bool

    def attribute(self, model: nn.Module, inputs: Tensor, target: Target) -> Tensor:
        """(B, C, S, S) inputs -> (B, S, S) or (B, h, w) float map per row."""
        ...


# ---------------------------------------------------------------- speed
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(model: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters()) + tuple(
        (b.data_ptr(), b._version) for b in model.buffers()
    )


def inference_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every Conv + BatchNorm pair (2-D or 3-D) folded into one conv.

    Same function (to float rounding, ~1e-8), a third less CPU time per forward;
    cached per model and rebuilt when its weights change. A model in training
    mode, or one without such pairs, is returned as is.
    """
    if model.training:
        return model
    key = _weights_key(model)
    hit = _FUSED.get(model)
    if hit is not None and hit[0] == key:
        hit[1].explain_reference = getattr(model, "explain_reference", None)  # set after caching
        return hit[1]
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model)
    changed = False
    for mod in fused.modules():
        if isinstance(mod, nn.Sequential):
            for i in range(len(mod) - 1):
                if (isinstance(mod[i], nn.Conv2d) and isinstance(mod[i + 1], nn.BatchNorm2d)) or (
                    isinstance(mod[i], nn.Conv3d) and isinstance(mod[i + 1], nn.BatchNorm3d)
                ):
                    mod[i] = fuse_conv_bn_eval(mod[i], mod[i + 1])
                    mod[i + 1] = nn.Identity()
                    changed = True
    if not changed:
        return model
    fused.eval()
    for p in fused.parameters():
        p.requires_grad_(False)  # input attributions only: no parameter gradients
    _FUSED[model] = (key, fused)
    return fused


class SharedForward:
    """Every target of one image from one forward per perturbed batch.

    Perturbation methods explain each target in a separate captum call; when the
    perturbations repeat exactly (occlusion always; LIME under the same seed),
    the outputs recorded on the first call are replayed for the other targets
    (checked with torch.equal on the inputs), so an image costs its forwards once
    however many scores (class logit, similarity to each neighbour) it explains.
    """

    def __init__(self, model: nn.Module, weighting: str, classes: Tensor, others: Tensor):
        self.model, self.weighting = model, weighting
        self.classes, self.others = classes, others.float()
        self.records: list[tuple[Tensor, Tensor]] = []
        self.column, self.calls = 0, 0

    def select(self, column: int) -> SharedForward:
        self.column, self.calls = column, 0
        return self

    def scores(self, x: Tensor) -> Tensor:
        out = self.model.run(x, self.weighting)
        logits = explained_logits(self.model, out.logits)[:, self.classes.clamp_min(0)]
        sims = out.embedding @ self.others.T.to(out.embedding.dtype)
        return torch.where((self.classes >= 0)[None], logits, sims)  # (P, T)

    def __call__(self, x: Tensor) -> Tensor:
        i = self.calls
        self.calls += 1
        if (
            i < len(self.records)
            and self.records[i][0].shape == x.shape
            and torch.equal(self.records[i][0], x)
        ):
            return self.records[i][1][:, self.column]
        out = self.scores(x)
        if i == len(self.records):
            self.records.append((x.detach().clone(), out.detach()))
        return out[:, self.column]


def _image_groups(inputs: Tensor) -> list[list[int]]:
    """Rows grouped by identical input image (the query appears once per target)."""
    groups: list[list[int]] = []
    for i in range(len(inputs)):
        for g in groups:
            if torch.equal(inputs[g[0]], inputs[i]):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _per_image(model: nn.Module, inputs: Tensor, target: Target, run_one: Callable) -> Tensor:
    """Run ``run_one(forward, x_row, row)`` per row, sharing forwards among rows of one image."""
    p = _prepare(model, inputs, target)
    out: list[Tensor | None] = [None] * len(inputs)
    if p.target is None:
        for i in range(len(inputs)):
            out[i] = run_one(p.forward, inputs[i : i + 1], i)
    else:
        for g in _image_groups(inputs):
            shared = SharedForward(
                model, p.target.weighting, p.target.classes[g], p.target.others[g]
            )
            for k, row in enumerate(g):
                out[row] = run_one(shared.select(k), inputs[row : row + 1], row)
    return torch.cat(out)


@contextlib.contextmanager
def _grad_mode():
    """Gradients on (the service may call us under no_grad); captum's notice that it set
    requires_grad on the inputs is expected and silenced."""
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
        # captum announces the hooks that guided backprop / deconvolution / DeepLIFT set
        warnings.filterwarnings("ignore", message=".*Setting (forward, )?backward hooks.*")
        yield


def _channel_max_abs(attr: Tensor) -> Tensor:
    return attr.detach().abs().amax(dim=1)


def _seeded(fn):
    """Run a stochastic method under a fixed seed without touching the global RNG."""

    def wrapper(self, *a, **kw):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(self, "seed", SEED))
            return fn(self, *a, **kw)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class GradCAM:
    name, expensive = "gradcam", False

    def __init__(self, upsample: bool = True, layer: int | None = None):
        self.upsample = upsample
        self.layer = layer  # a block of backbone.features; None: the model's cam_layer

    def attribute(self, model, inputs, target):
        from captum.attr import LayerGradCam

        model = inference_model(model)
        p = _prepare(model, inputs, target)
        layer = model.cam_layer if self.layer is None else model.backbone.features[self.layer]
        with _grad_mode():
            cam = LayerGradCam(p.forward, layer).attribute(
                inputs, additional_forward_args=p.args, relu_attributions=True
            )
        return cam_map(cam.detach(), inputs, self.upsample)


def cam_map(cam, inputs, upsample: bool):
    """(N, 1, h, w) CAM -> (N, H, W) map, bilinearly upsampled to the input when asked, each
    cell at its receptive field's centre (``upsample_cells``; captum's
    ``LayerAttribution.interpolate`` puts it half a cell off).

    A volume's (N, 1, d, h, w) CAM -> (N, D, H, W), trilinearly upsampled."""
    cam = cam[:, 0]
    return upsample_cells(cam, tuple(inputs.shape[2:])) if upsample else cam


class Gradient:
    name, expensive = "gradient", False

    def attribute(self, model, inputs, target):
        from captum.attr import Saliency

        model = inference_model(model)
        p = _prepare(model, inputs, target)
        with _grad_mode():
            attr = Saliency(p.forward).attribute(inputs, additional_forward_args=p.args, abs=True)
        return _channel_max_abs(attr)


class SmoothGrad:
    name, expensive = "smoothgrad", True

    def __init__(
        self, samples: int = SMOOTHGRAD_SAMPLES, noise: float = SMOOTHGRAD_NOISE, seed: int = SEED
    ):
        self.samples, self.noise, self.seed = samples, noise, seed

    @_seeded
    def attribute(self, model, inputs, target):
        from captum.attr import NoiseTunnel, Saliency

        model = inference_model(model)
        p = _prepare(model, inputs, target)
        stdev = self.noise * float(inputs.max() - inputs.min())
        batch = max(1, FORWARD_BATCH // len(inputs))
        with _grad_mode():
            attr = NoiseTunnel(Saliency(p.forward)).attribute(
                inputs,
                nt_type="smoothgrad",
                nt_samples=self.samples,
                nt_samples_batch_size=batch,
                stdevs=max(stdev, 1e-6),
                additional_forward_args=p.args,
                abs=True,
            )
        return _channel_max_abs(attr)


class IntegratedGradients:
    name, expensive = "integrated_gradients", True

    def __init__(self, steps: int = IG_STEPS):
        self.steps = steps

    def attribute(self, model, inputs, target):
        from captum.attr import IntegratedGradients as IG

        model = inference_model(model)
        p = _prepare(model, inputs, target)
        with _grad_mode():
            attr = IG(p.forward).attribute(
                inputs,
                baselines=torch.zeros_like(inputs),
                additional_forward_args=p.args,
                n_steps=self.steps,
                method="gausslegendre",
                internal_batch_size=max(FORWARD_BATCH, len(inputs)),
            )
        return _channel_max_abs(attr)


def occlusion_window(size: int, fraction: float = OCCLUSION_WINDOW) -> tuple[int, int]:
    """(window, stride) in pixels for an input side: window ~ side/6, stride half of it."""
    window = max(1, round(size * fraction))
    return window, max(1, window // 2)


class Occlusion:
    name, expensive = "occlusion", True

    def __init__(self, fraction: float = OCCLUSION_WINDOW):
        self.fraction = fraction

    def attribute(self, model, inputs, target):
        from captum.attr import Occlusion as Occ

        model = inference_model(model)
        c, *sides = inputs.shape[1:]  # (C, H, W), or (C, D, H, W) for a volume
        # a volume's window is a quarter of each side (7 positions per axis, 343 forwards);
        # a sixth, as for images, would be 1,331 forwards per volume
        fraction = self.fraction if len(sides) == 2 else OCCLUSION_WINDOW_3D
        windows = [occlusion_window(n, fraction) for n in sides]

        def one(forward, x, _row):
            return Occ(forward).attribute(
                x,
                sliding_window_shapes=(c, *(w for w, _ in windows)),
                strides=(c, *(s for _, s in windows)),
                baselines=0.0,
                perturbations_per_eval=FORWARD_BATCH,
            )

        with torch.no_grad():
            attr = _per_image(model, inputs, target, one)
        return attr.detach().mean(dim=1)  # the window spans every channel: equal across channels


def superpixels(image: np.ndarray, n_segments: int = LIME_SEGMENTS) -> np.ndarray:
    """SLIC superpixels of an (H, W, C) image in [0, 1] -> (H, W) int64 labels 0..K-1; of a
    (D, H, W, 1) volume -> (D, H, W) supervoxels (SLIC in 3-D, grayscale)."""
    from skimage.segmentation import slic

    img = np.asarray(image, np.float64)
    volume = img.ndim == 4
    if img.ndim in (3, 4) and img.shape[-1] == 1:
        img = img[..., 0]
    gray = img.ndim == 2 or volume
    # compactness on the [0, 1] intensity scale: 0.1 follows intensity edges for
    # grayscale films; colour (Lab) distances are ~100× larger, hence 10.
    labels = slic(
        img,
        n_segments=n_segments,
        compactness=0.1 if gray else 10.0,
        channel_axis=None if gray else -1,
        start_label=0,
        sigma=1.0,
    )
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.int64)


LIME_KERNEL_WIDTH = 0.25


def lime_kernel(original, perturbed, interpretable, **kwargs) -> Tensor:
    """The LIME package's image kernel: exp(-d² / 2w²), d the cosine distance between the
    sample's on/off superpixel vector and all-on, w = 0.25 (cheaper than captum's default,
    which compares whole images)."""
    z = interpretable.float().reshape(-1)
    cos = z.sum() / (z.norm() * math.sqrt(z.numel())).clamp_min(1e-12)
    return torch.exp(-((1.0 - cos) ** 2) / (2 * LIME_KERNEL_WIDTH**2))


class Lime:
    name, expensive = "lime", True

    def __init__(
        self, samples: int = LIME_SAMPLES, segments: int = LIME_SEGMENTS, seed: int = SEED
    ):
        self.samples, self.segments, self.seed = samples, segments, seed

    def feature_mask(self, model, inputs: Tensor) -> Tensor:
        """(N, 1, H, W) superpixel labels, or (N, 1, D, H, W) supervoxels for a volume."""
        grid = (1,) * (inputs.ndim - 2)
        kw = dict(dtype=inputs.dtype, device=inputs.device)
        mean = torch.tensor(model.config.mean, **kw).view(1, -1, *grid)
        std = torch.tensor(model.config.std, **kw).view(1, -1, *grid)
        last = (0, *range(2, inputs.ndim), 1)  # channels last
        pix = (inputs.detach() * std + mean).clamp(0, 1).permute(*last).cpu().numpy()
        segments = self.segments if inputs.ndim == 4 else VOLUME_LIME_SEGMENTS
        masks = [superpixels(img, segments) for img in pix]
        return torch.from_numpy(np.stack(masks))[:, None].to(inputs.device)

    def attribute(self, model, inputs, target):
        from captum._utils.models.linear_model import SkLearnRidge
        from captum.attr import Lime as CaptumLime

        model = inference_model(model)
        fmask = self.feature_mask(model, inputs)

        def one(forward, x, row):  # one surrogate per image and target (LIME is per-example)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # the same samples for every target of an image
                lime = CaptumLime(
                    forward,
                    interpretable_model=SkLearnRidge(alpha=1.0),
                    similarity_func=lime_kernel,
                )
                samples = self.samples if x.ndim == 4 else VOLUME_LIME_SAMPLES
                attr = lime.attribute(
                    x,
                    baselines=0.0,
                    feature_mask=fmask[row : row + 1],
                    n_samples=samples,
                    perturbations_per_eval=min(samples, FORWARD_BATCH),
                )
            return attr[:, 0]

        with torch.no_grad():
            return _per_image(model, inputs, target, one).detach()


class Similarity:
    """The exact decomposition; no gradient, one forward."""

    name, expensive = "similarity", False

    def attribute(self, model, inputs, target):
        if callable(target) and not isinstance(target, ScoreTarget | Tensor):
            raise CasebaseError(
                "the similarity decomposition explains a class logit or a similarity, "
                "not an arbitrary score function"
            )
        p = _prepare(model, inputs, target)
        t = p.target
        with torch.no_grad():
            out = model.run(inputs, t.weighting)
            f, w = out.features, out.weights
            grid = f.shape[2:]  # (h, w), or (d, h, w) for a volume model
            f, w = f.flatten(2), w.flatten(1)
            hw = grid.numel()
            # class rows: class activation map, W_c · F_ij / hw (sums to logit - bias; with a
            # reference class, (W_c - W_ref) · F_ij / hw, as explained_logits)
            cam = torch.einsum("bc,bcn->bn", explained_class_weights(model, t.classes), f) / hw
            # similarity rows: w_ij (P F_ij) · e_other / ‖P p‖ (sums to the cosine similarity)
            z = torch.einsum("dc,bcn->bdn", model.projection.weight, f)
            pooled = torch.einsum("bn,bdn->bd", w, z)
            others = t.others.to(z.dtype)
            extent = getattr(model, "has_extent", False)
            if extent:  # as similarity.decompose splits it
                from retrieval.explain.similarity import extent_allocation

                c2 = float(model.config.extent_weight) ** 2
                code = (out.embedding[:, -2:].to(z.dtype) * others[:, -2:]).sum(1)
                alloc = extent_allocation(out.lesion_fraction, w).to(z.dtype)
                others = others[:, :-2] / (1.0 + c2) ** 0.5
            sim = w * torch.einsum("bdn,bd->bn", z, others)
            sim = sim / pooled.norm(dim=1).clamp_min(1e-12)[:, None]
            if extent:
                sim = sim + code[:, None] * alloc
            out = torch.where((t.classes >= 0)[:, None], cam, sim)
            return out.reshape(out.shape[0], *grid)


# the rest of the J. Imaging 2020 review's table, one module per family (retrieval.explain.methods)
from retrieval.explain.methods import cam, gradients, relevance, shapley  # noqa: E402

REGISTRY: dict[str, Explainer] = {
    e.name: e
    for e in (
        GradCAM(),
        Gradient(),
        SmoothGrad(),
        IntegratedGradients(),
        Occlusion(),
        Lime(),
        Similarity(),
        gradients.InputXGradient(),
        gradients.GuidedBackprop(),
        gradients.Deconvolution(),
        cam.GuidedGradCAM(),
        cam.GradCAMPlusPlus(),
        gradients.DeepLift(),
        shapley.DeepLiftShap(),
        shapley.GradientShap(),
        shapley.KernelShap(),
        relevance.LRP(),
    )
}
METHODS: tuple[str, ...] = tuple(REGISTRY)
EXPENSIVE: frozenset[str] = frozenset(n for n, e in REGISTRY.items() if e.expensive)


def check_names(methods: Iterable[str]) -> list[str]:
    """Validate method names (the DESIGN.md contract); raise CasebaseError naming the valid ones."""
    methods = list(methods)
    bad = [m for m in methods if m not in REGISTRY]
    if bad:
        raise CasebaseError(
            f"unknown explanation method{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
            f"choose from: {', '.join(METHODS)}"
        )
    return methods


def get(name: str) -> Explainer:
    check_names([name])
    return REGISTRY[name]


def finite(maps: Tensor) -> np.ndarray:
    """(B, h, w) tensor -> float32 numpy with NaN/inf replaced (for map_to_original)."""
    return np.nan_to_num(maps.detach().float().cpu().numpy(), nan=0.0, posinf=0.0, neginf=0.0)


def resize_maps(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """(B, h, w) maps over feature cells -> (B, *size) over the input grid, bilinear, each cell
    at its centre; a volume's (B, d, h, w) maps -> (B, *size), trilinear."""
    return upsample_cells(maps, size)
