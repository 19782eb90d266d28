"""The embedding model: a CNN backbone, a classifier head and an embedding head.

    F = backbone(x)                       feature map, (C, h, w)
    logits = W · mean_ij F_ij + b         classifier on global-average-pooled features
    A_ij = ReLU(Σ_k (W_ck / hw) F_kij)    Grad-CAM of class c at the last block
    s_ij = A_ij / Σ A                     saliency weights (uniform if Σ A = 0)
    p = Σ_ij s_ij F_ij                    saliency-weighted pooling
    e = P p / ‖P p‖                       L2-normalised embedding (P linear, no bias)

Because the classifier is linear on the average-pooled map, ∂logit_c/∂F_kij =
W_ck / hw everywhere, so Grad-CAM's channel weights are exactly W_c / hw: the
saliency map costs one (C × h·w) product and no second forward or backward
pass. (tests check it against pytorch-grad-cam to 1e-5.)

The same maths holds for volumes (``--backbone cnn3d``): F is (C, d, h, w), the mean runs
over all d·h·w voxels of the feature volume, Grad-CAM's channel weights are exactly
W_c / (d·h·w), and every sum over cells i, j runs over voxels. The code works on the
flattened spatial axes, so 2-D and 3-D share one implementation.

With uniform weighting s_ij = 1/hw. Because P is linear and the pooling is a
weighted sum, the cosine similarity of two embeddings splits exactly into
query-location × case-location terms (see retrieval.explain.similarity).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from retrieval import atomic
from retrieval.errors import BundleError
from retrieval.model import extent

MODEL_FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model and its preprocessing."""

    classes: list[str]
    backbone: str = "compact"
    in_channels: int = 1
    image_size: int = 128
    embedding_dim: int = 128
    # compact backbone: channels of the first stage (then 2x, 4x, 8x). 32 for models saved
    # before the option existed; training picks its own default (see retrieval.model.train).
    width: int = 32
    # 0: a 2-D model (images resized to image_size x image_size). > 0: a volume model
    # (cnn3d): volumes resized to depth x image_size x image_size (D, H, W).
    depth: int = 0
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.25])
    format_version: int = MODEL_FORMAT_VERSION
    training: dict = field(default_factory=dict)
    # > 0: the model has a lesion-extent head (taught by the manifest's lesion masks) and its
    # embedding ends with the extent code at this weight (retrieval.model.extent); 0: neither
    # (every model saved before the option, and models trained without masks)
    extent_weight: float = 0.0
    extent_knots: list[float] = field(default_factory=list)  # see extent.fit_knots

    @property
    def output_dim(self) -> int:
        """Length of the index's vectors: the projection, plus the 2-D extent code if any."""
        return self.embedding_dim + (2 if self.extent_weight > 0 else 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


# the convolution and batch norm of 2-D images and of volumes (cnn3d): one block definition
_CONV_BN = {2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}


def _conv_bn(cin: int, cout: int, stride: int = 1, dims: int = 2) -> nn.Sequential:
    conv, bn = _CONV_BN[dims]
    return nn.Sequential(
        conv(cin, cout, 3, stride=stride, padding=1, bias=False),
        bn(cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, ch: int, dims: int = 2):
        super().__init__()
        conv, bn = _CONV_BN[dims]
        self.body = nn.Sequential(
            conv(ch, ch, 3, padding=1, bias=False),
            bn(ch),
            nn.ReLU(inplace=True),
            conv(ch, ch, 3, padding=1, bias=False),
            bn(ch),
        )

    def forward(self, x):
        return F.relu(x + self.body(x))


def zero_init_residuals(model: nn.Module) -> None:
    """Start every residual block as the identity: its last batch norm's scale at 0.

    Goyal et al. 2017 (torchvision's ``zero_init_residual``): each block's branch starts
    silent and grows only where the loss asks for it. ``train --zero-init-residual``, an
    option: on the CT phantoms it lifted cnn3d's Grad-CAM pointing game two- to four-fold in
    every run that learned, but one CPU run of six stayed at chance
    (bench/volume_init_sweep.py, bench/volumes.py)."""
    for m in model.modules():
        if isinstance(m, _Residual):
            nn.init.zeros_(m.body[-1].weight)


class CompactBackbone(nn.Module):
    """A small residual CNN (stride 16; about 1.9 M parameters at width 32, 0.47 M at 16).

    Chosen over resnet18 as the default because weights are trained from
    scratch here (no pretrained download), data sets are small, and training and
    index builds must run on 2 CPU cores; stride 16 keeps an 8×8 map at 128 px, fine
    enough for matched regions. Compute grows with width²: width 16 costs a quarter
    of width 32 per image.
    """

    stride = 16

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.out_channels = widths[-1]
        # No residual block at stride 2: it would cost half the compute for little gain.
        layers: list[nn.Module] = [_conv_bn(in_channels, widths[0], stride=2)]
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [_conv_bn(cin, cout, stride=2), _Residual(cout)]
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class ResNet18Backbone(nn.Module):
    """torchvision resnet18, random init, first conv adapted to the channel count (stride 32)."""

    out_channels = 512
    stride = 32

    def __init__(self, in_channels: int, width: int = 32):  # width: the compact net's only
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.features = nn.Sequential(
            net.conv1,
            net.bn1,
            net.relu,
            net.maxpool,
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def forward(self, x):
        return self.features(x)


class Compact3DBackbone(nn.Module):
    """The compact backbone in 3-D (Conv3d / BatchNorm3d / ReLU; widths w, 2w, 4w, 8w).

    Stride 8 along every axis (the last stage keeps its resolution): a 32 x 64 x 64
    volume gives a 4 x 8 x 8 feature volume, the in-plane grid the 2-D model has at
    128 px, fine enough for matched regions and the pointing game.
    """

    stride = 8
    # The CAM explainers' block: the residual block where the stride-8 grid starts, not the
    # last one. The last stage (features.5-6) widens the channels at the same grid; Grad-CAM
    # there spreads onto anatomy (explain-eval pointing game 0.14 on the CT phantom, 0.31 on
    # ct96); at features.4, 0.43 and 0.61 (bench/volume_cam_layer.py: the best block on the
    # feature volume's grid on CT, and the best of all on ct96).
    cam_index = 4

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.out_channels = widths[-1]
        layers: list[nn.Module] = [_conv_bn(in_channels, widths[0], stride=2, dims=3)]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers += [_conv_bn(cin, cout, stride=2 if i < 2 else 1, dims=3), _Residual(cout, 3)]
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class _ToSlices(nn.Module):
    """(B, C, D, H, W) -> (B·D, C, H, W): every slice through the 2-D backbone."""

    def forward(self, x):
        b, c, d, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)


class _FromSlices(nn.Module):
    """(B·D, C, h, w) -> (B, C, D, h, w): the slices' feature maps stacked into a feature volume."""

    def __init__(self, depth: int):
        super().__init__()
        self.depth = depth

    def forward(self, x):
        bd, c, h, w = x.shape
        return x.reshape(bd // self.depth, self.depth, c, h, w).permute(0, 2, 1, 3, 4)


class SliceBackbone(nn.Module):
    """2.5D (``--backbone slices``): the compact 2-D backbone run on every axial slice.

    The slices' (C, h, w) maps are stacked into a (C, D, h, w) feature volume, so the head,
    the Grad-CAM (channel weights W / (D·h·w)) and the saliency-weighted pooling are the
    volume ones: the saliency weights over (slice, row, col) pool the slices by their
    saliency. Stride 16 in plane, 1 along the slices (a 32 x 64 x 64 input gives 32 x 4 x 4).
    The last module stacks the slices, so ``target_layer`` sees the feature volume.
    """

    stride = 16

    def __init__(self, in_channels: int, width: int = 32, depth: int = 32):
        super().__init__()
        inner = CompactBackbone(in_channels, width)
        self.out_channels = inner.out_channels
        self.features = nn.Sequential(_ToSlices(), *inner.features, _FromSlices(depth))

    def forward(self, x):
        return self.features(x)


BACKBONES = {
    "compact": CompactBackbone,
    "resnet18": ResNet18Backbone,
    "cnn3d": Compact3DBackbone,
    "slices": SliceBackbone,
}
# backbones whose input is a volume (B, C, D, H, W)
VOLUME_BACKBONES = frozenset({"cnn3d", "slices"})


@dataclass
class EmbeddingOutput:
    """One pass of the model: everything the index and the explainers need."""

    embedding: torch.Tensor  # (B, D) L2-normalised
    logits: torch.Tensor  # (B, K)
    features: torch.Tensor  # (B, C, h, w) last feature map ((B, C, d, h, w) for volumes)
    weights: torch.Tensor  # (B, h, w) pooling weights, each summing to 1 ((B, d, h, w))
    predicted: torch.Tensor  # (B,) class index whose Grad-CAM weighted the pooling
    # with an extent head (ModelConfig.extent_weight > 0), else None:
    lesion_fraction: torch.Tensor | None = None  # (B, h, w) predicted lesion share per cell
    extent_angle: torch.Tensor | None = None  # (B,) the extent code's angle t


class CaseNet(nn.Module):
    # class index that class explanations are contrasted with (logit(c) - logit(ref)); set by
    # CaseRetriever.set_reference_class, read by retrieval.explain.registry.explained_logits
    explain_reference: int | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.backbone not in BACKBONES:
            raise BundleError(
                f"unknown backbone {config.backbone!r}: choose one of {', '.join(BACKBONES)}"
            )
        self.config = config
        if (config.backbone in VOLUME_BACKBONES) != (config.depth > 0):
            raise BundleError(
                f"backbone {config.backbone!r} with depth {config.depth}: volume backbones "
                "need a depth > 0 and image backbones depth 0"
            )
        if config.width < 4:
            raise BundleError(f"backbone width {config.width}: must be at least 4")
        if config.backbone == "slices":
            self.backbone = SliceBackbone(config.in_channels, config.width, config.depth)
        else:
            self.backbone = BACKBONES[config.backbone](config.in_channels, config.width)
        channels = self.backbone.out_channels
        self.classifier = nn.Linear(channels, len(config.classes))
        self.projection = nn.Linear(channels, config.embedding_dim, bias=False)
        if config.extent_weight > 0:
            if self.is_volume:
                raise BundleError("the lesion-extent head is for 2-D images, not volumes")
            if len(config.extent_knots) < 2:
                raise BundleError("a model with an extent head needs its extent_knots")
            self.extent_head = nn.Conv2d(channels, 1, 1)

    @property
    def has_extent(self) -> bool:
        return self.config.extent_weight > 0

    @property
    def target_layer(self) -> nn.Module:
        """The last block: where the embedding's closed-form Grad-CAM and the similarity
        decomposition look."""
        return self.backbone.features[-1]

    @property
    def cam_index(self) -> int:
        """Index in ``backbone.features`` of the block the CAM explainers (Grad-CAM,
        Grad-CAM++, Guided Grad-CAM) look at: the backbone's ``cam_index``, else the last."""
        n = len(self.backbone.features)
        return getattr(self.backbone, "cam_index", n - 1) % n

    @property
    def cam_layer(self) -> nn.Module:
        return self.backbone.features[self.cam_index]

    @property
    def is_volume(self) -> bool:
        return self.config.backbone in VOLUME_BACKBONES

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """Global average pooling over every spatial axis: (B, C, *grid) -> (B, C)."""
        return features.flatten(2).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (what captum's class explanations differentiate)."""
        return self.classifier(self.pool(self.backbone(x)))

    def gradcam(self, features: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
        """Grad-CAM at the last block, in closed form: ReLU(Σ_k W_ck/hw · F_k).

        (B, C, *grid) -> (B, *grid); the channel weights are W_c / n for n = h·w cells
        (d·h·w voxels for a volume)."""
        grid = features.shape[2:]
        weights = self.classifier.weight[class_idx] / grid.numel()  # (B, C)
        cam = torch.einsum("bc,bcn->bn", weights, features.flatten(2))
        return F.relu(cam).reshape(features.shape[0], *grid)

    @staticmethod
    def saliency_weights(cam: torch.Tensor) -> torch.Tensor:
        """Normalise a (B, *grid) map to pooling weights; uniform where the map is all zero."""
        dims = tuple(range(1, cam.dim()))
        total = cam.sum(dim=dims, keepdim=True)
        uniform = torch.full_like(cam, 1.0 / cam[0].numel())
        return torch.where(total > 1e-12, cam / total.clamp_min(1e-12), uniform)

    def embed_features(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("bn,bcn->bc", weights.flatten(1), features.flatten(2))
        return F.normalize(self.projection(pooled), dim=1)

    def embed(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The index's vector from a feature map and its pooling weights: embed_features, with
        the extent code appended when the model has an extent head (as ``run`` gives it)."""
        e = self.embed_features(features, weights)
        if not self.has_extent:
            return e
        return self.with_extent(e, self.extent_angle(self.lesion_fraction(features)))

    def lesion_fraction(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w): the extent head's predicted lesion share of each cell."""
        return torch.sigmoid(self.extent_head(features.to(self.extent_head.weight.dtype)))[:, 0]

    def extent_angle(self, fractions: torch.Tensor) -> torch.Tensor:
        """(B, h, w) predicted fractions -> (B,) angle of the extent code."""
        return extent.angle(fractions.flatten(1).mean(1), self.config.extent_knots)

    def with_extent(self, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The appearance embedding e (B, D) with the extent code of angle t appended."""
        return extent.append_code(e, t, self.config.extent_weight)

    def run(self, x: torch.Tensor, weighting: str = "saliency") -> EmbeddingOutput:
        """One forward: logits, Grad-CAM of the predicted class, pooled embedding."""
        features = self.backbone(x)
        logits = self.classifier(self.pool(features))
        predicted = logits.argmax(dim=1)
        if weighting == "saliency":
            weights = self.saliency_weights(self.gradcam(features, predicted).detach())
        elif weighting == "uniform":
            grid = features.shape[2:]
            weights = features.new_full((features.shape[0], *grid), 1.0 / grid.numel())
        else:
            raise ValueError(f"unknown weighting {weighting!r}")
        if not self.has_extent:
            embedding = self.embed_features(features, weights)
            return EmbeddingOutput(embedding, logits, features, weights, predicted)
        fractions = self.lesion_fraction(features)
        t = self.extent_angle(fractions)
        embedding = self.with_extent(self.embed_features(features, weights), t)
        return EmbeddingOutput(embedding, logits, features, weights, predicted, fractions, t)


def save_model(model: CaseNet, out_dir: str | Path) -> None:
    """Write weights.safetensors + config.json atomically (the previous model survives a kill)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "casebase-model"})
        (tmp / CONFIG_FILE).write_text(model.config.to_json())


def weights_fingerprint(model_dir: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(model_dir: str | Path, device: torch.device | str = "cpu") -> CaseNet:
    """Rebuild a CaseNet from a model folder; safetensors only, nothing unpickled."""
    model_dir = Path(model_dir)
    cfg_path, w_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise BundleError(f"{p}: missing (not a casebase model folder?)")
    try:
        config = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    except (ValueError, TypeError) as err:
        raise BundleError(f"{cfg_path}: not a valid model config ({err})") from None
    if config.format_version > MODEL_FORMAT_VERSION:
        raise BundleError(
            f"{cfg_path}: model format version {config.format_version} is newer than this "
            f"casebase understands ({MODEL_FORMAT_VERSION}); upgrade casebase"
        )
    model = CaseNet(config)
    try:
        state = load_file(str(w_path))
        model.load_state_dict(state)
    except Exception as err:  # safetensors raises several types for corrupt files
        raise BundleError(f"{w_path}: cannot load weights ({type(err).__name__}: {err})") from None
    return model.to(device).eval()
