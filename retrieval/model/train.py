"""Training: cross-entropy + a supervised metric loss + a two-view instance term.

    loss = CE(logits, y) + SupCon(e_saliency, y) + SupCon(e_uniform, y)
           + 0.5 * (NTXent(e_saliency, case) + NTXent(e_uniform, case))
           + 2 * (BCE(lesion fraction per cell) + 2 * |log lesion area - log true area|)

The last term only when the manifest has lesion masks (at least half the training cases, 2-D
images; ``--extent-weight 0`` turns it off): it teaches the extent head whose code the embedding
carries, so neighbours agree in lesion size (retrieval.model.extent).

Each step takes class-balanced cases (MPerClassSampler), augments every case twice, and
runs both views in one forward. SupCon (pytorch-metric-learning, temperature 0.1) keeps
classes apart; the NT-Xent term (temperature 0.2, as in SimCLR) asks the two views of a
case to find each other among all the batch's views, so cases of one class stay spread by
how they look instead of collapsing onto one direction (what triplet + CE did: median
top-1 cosine 0.9996, top-10 0.9983). ``--loss triplet --instance-weight 0`` is the former
loss. Both pooled embeddings are trained from the same feature map (one forward), so one
model serves `--weighting saliency` and `--weighting uniform` index builds. Early stopping
watches validation precision@1 + accuracy (never before half the one-cycle schedule); the
best epoch's weights are kept. Seeded; AMP on CUDA. bench/depth.py measures the choice.

Small lesions on a varied background give a plateau at chance that a run can
stay on for its whole schedule (seen at the former default lr 2e-3 on the
600-case phantom). Hence lr 1e-3 (AdamW, one-cycle) and a stall guard: a schedule whose
classifier *and* retrieval are both still at chance after 30 % of its epochs restarts from
a new initialisation at half the rate (at most 3 schedules; ``TrainReport.attempts`` and
the model's config record each, and ``TrainReport.summary`` says every epoch that ran).
A run whose retrieval has left chance is never restarted for its head alone.

Volumes (cnn3d, slices) add ``peak_weight`` x CE of the same linear head on peak-pooled
features (see peak_pool) and take 6 cases a step instead of 24: a lesion of ~0.1 % of
a volume got 1 or 2 / 256 of the average-pooled gradient, and a few hundred volumes
made ~230 steps in a schedule, so 3-D training found the lesion for one training seed in
three (issue 23). The model itself, its Grad-CAM and its embedding maths are unchanged.
``--peak-pool logits`` pools each class's per-cell logit map instead (peak_logits), and
``both`` adds one CE of each; measured and not the default (bench/volumes.py,
bench/volume_gradcam_peaks.py): on the CT phantom ``logits`` put Grad-CAM's maximum in a
lesion cell more often, but ``both`` on the untuned ct96 phantom left it on no lesion.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners, samplers
from torch import nn
from tqdm.auto import tqdm

from retrieval.data.imageio import read_image
from retrieval.data.manifest import count_dimensions, load_manifest, mixed_dimensions_note
from retrieval.errors import CasebaseError
from retrieval.model import extent
from retrieval.model.augment import DEFAULT_SCALE_JITTER, augment_batch, augment_volume_batch
from retrieval.model.dataset import decode_all
from retrieval.model.device import resolve_device
from retrieval.model.network import (
    VOLUME_BACKBONES,
    CaseNet,
    ModelConfig,
    save_model,
    zero_init_residuals,
)
from retrieval.model.preprocess import Preprocessor


@dataclass
class TrainOptions:
    epochs: int | None = None  # None: sized to the data (see default_epochs)
    backbone: str = "auto"  # auto: cnn3d for volumes, else compact | resnet18 | slices
    width: int | None = None  # compact backbone width; None: DEFAULT_WIDTH
    image_size: int | None = None
    depth: int | None = None  # cnn3d: slices of the model input; None: from the data
    # start each residual block as the identity (its last batch norm's scale at 0); an option,
    # not the default: see network.zero_init_residuals
    zero_init_residual: bool = False
    embedding_dim: int = 128
    batch_size: int | None = None  # images per step (both views of a case count)
    lr: float = 1e-3
    loss: str = "supcon"  # supcon | multisimilarity | triplet (the former default)
    temperature: float = 0.1  # supervised contrastive temperature
    instance_weight: float = 0.5  # weight of the two-view NT-Xent term (0: one view, no term)
    instance_temperature: float = 0.2
    aug_scale: float = DEFAULT_SCALE_JITTER  # zoom jitter of the augmented views (0: none)
    aug_colour: float = 0.0  # RGB channel-gain / saturation jitter of the views (0: none)
    # weight of the auxiliary peak-pooled cross-entropy (see peak_pool); None: PEAK_WEIGHT for
    # volume backbones, 0 for 2-D images
    peak_weight: float | None = None
    # what the peak term pools: "features" (each channel's top cells, then the head; see
    # peak_pool), "logits" (each class's top cells of its per-cell logit map; see peak_logits)
    # or "both" (one cross-entropy each)
    peak_pool: str = "features"
    # weight c of the lesion-extent code in the embedding (retrieval.model.extent); None: EXTENT_WEIGHT
    # when at least half the training cases have a lesion mask (2-D images), else 0 (no head)
    extent_weight: float | None = None
    extent_loss_weight: float = extent.LOSS_WEIGHT  # weight of the extent head's loss
    extent_area_weight: float = extent.AREA_LOSS_WEIGHT  # its log-area term (extent_loss)
    margin: float = 0.2  # triplet only
    patience: int = 6
    seed: int = 0
    device: str = "auto"
    strict: bool = False
    num_workers: int | None = None
    progress: bool = True


@dataclass
class TrainReport:
    model_dir: str
    epochs_run: int
    best_epoch: int
    best_val: dict
    n_train: int
    n_val: int
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)  # one per training schedule started
    max_epochs: int = 0  # the schedule's length (early stopping may end it sooner)
    epochs_total: int = 0  # epochs over every schedule started, abandoned ones included

    def summary(self) -> str:
        """What ran, in one line: the kept schedule, and any abandoned ones."""
        text = f"{self.epochs_run} of {self.max_epochs} epochs (best {self.best_epoch})"
        extra = self.epochs_total - self.epochs_run
        if extra:
            n = len(self.attempts) - 1
            text += f" + {extra} in {n} abandoned schedule{'s' if n > 1 else ''} ({self.epochs_total} in all)"
        return text


# Stall guard (see _fit): a schedule whose val balanced accuracy is still within STALL_MARGIN of
# chance after STALL_FRACTION of its epochs is restarted from a new initialisation at half the
# learning rate, at most MAX_ATTEMPTS schedules in all (the last one always runs to the end).
MAX_ATTEMPTS = 3
STALL_MIN_EPOCHS = 10  # shorter schedules (smoke tests) are never judged
STALL_FRACTION = 0.3
STALL_MARGIN = 0.1  # on balanced accuracy and on retrieval precision@1, each against its chance
# Early stopping never ends a schedule before this share of its epochs (the one-cycle rate is
# still high before then, and a plateau there is not convergence).
MIN_EPOCH_FRACTION = 0.5
# Default width of the compact backbone (measured on 2 CPU cores, see bench/depth.py).
DEFAULT_WIDTH = 16
# Default epochs: about this many case-views (each case twice per epoch with the instance term).
SAMPLE_BUDGET = 12000
# Volumes: never fewer epochs than 300 volumes get (210 train cases x 2 views). The sample
# budget shrinks the epochs as the data grows (a constant number of steps), but a 3-D model
# with more classes to tell apart needs more steps, not fewer: at 400 volumes (4 classes, 22
# epochs by the budget) both CT phantoms with normals reached val accuracy 0.77 / 0.72 and
# P@5 0.87 / 0.79; at 29 epochs 0.90 / 0.95 and 0.90 / 0.99 (bench/volumes.py, docs/results.md).
MIN_VOLUME_EPOCHS = 29
# Cases per step by default (each in two augmented views when the instance term is on).
DEFAULT_CASES_PER_BATCH = 24
# Volumes: fewer cases per step. A few hundred volumes at 24 cases make 8 steps an epoch,
# about 230 in a whole schedule, too few for a 3-D model to find its lesion (at 6 cases a
# step a CT seed that stayed at chance learned; bench/volume_seeds.py).
DEFAULT_VOLUME_CASES_PER_BATCH = 6
LOSSES = ("supcon", "multisimilarity", "triplet")
# The auxiliary peak-pooled cross-entropy (peak_pool): on by default for volumes only.
PEAK_WEIGHT = 1.0
PEAK_FRACTION = 1 / 64  # of the feature cells: 4 of a 4 x 8 x 8 feature volume
# The lesion-extent code (retrieval.model.extent): on by default when the manifest has masks, at
# c = 0.5 (the code is c^2 / (1 + c^2) = 20 % of the cosine). On the 1,200-case phantoms c = 0.5
# and c = 1 gave the same size ratio (0.31 / 0.30 chest, 0.29 / 0.29 photo; bench/extent_head.py),
# and c = 1 (half the cosine) cost label P@5 on the site-marker phantom (bench/extent_shortcut.py).
EXTENT_WEIGHT = 0.5
EXTENT_MIN_MASKED = 0.5  # share of the training cases that must have a mask for the default


def peak_pool(features: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, C): each channel's mean over its top PEAK_FRACTION of cells.

    Training-only. The classifier reads the *average* over the feature grid (so Grad-CAM's
    channel weights stay exactly W / cells), and its gradient reaches every cell equally: a
    lesion of ~0.1 % of a volume fills 1 or 2 of 256 cells and gets that share of it, and a
    model can fit the background of 210 volumes first. The same linear head on the peak-pooled
    features (a weakly supervised localisation loss in the spirit of Pinheiro & Collobert's
    log-sum-exp pooling) sends the gradient to the cells that respond most, so channels learn
    to fire on the lesion; the model itself is unchanged.
    """
    flat = features.flatten(2)
    k = max(1, round(PEAK_FRACTION * flat.shape[-1]))
    return flat.topk(k, dim=-1).values.mean(-1)


# --peak-pool: the peak terms each choice adds (one cross-entropy each), and their loss names
PEAK_POOLS = {"features": ("features",), "logits": ("logits",), "both": ("features", "logits")}
_PEAK_TERM_NAMES = {"features": "peak-pooled", "logits": "peak-pooled logits"}


def peak_logits(classifier: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, K): each class's mean per-cell logit over its top PEAK_FRACTION cells.

    Training-only, like peak_pool, but pooled after the head (multiple-instance top-k pooling,
    as in Oquab et al. 2015 and Durand et al.'s WILDCAT). A cell that every case has (anatomy)
    gives every class the same per-cell logit, so it cannot raise the true class above the
    others: the true class's top cells must be cells that tell the classes apart. Grad-CAM of
    class c is ReLU of that per-cell logit map (less the bias, over the cell count), so this
    aims its maximum at the evidence. Measured (bench/volume_gradcam_peaks.py): it did so for
    CT cavities, not for nodules, whose maps peak on a fixed edge cell (top-k with a softmax
    does not penalise a cell that is high for one class in every case).
    """
    flat = features.flatten(2)  # (B, C, N)
    cells = torch.einsum("kc,bcn->bkn", classifier.weight.to(flat.dtype), flat)
    k = max(1, round(PEAK_FRACTION * flat.shape[-1]))
    return cells.topk(k, dim=-1).values.mean(-1) + classifier.bias.to(flat.dtype)


def peak_terms(classifier: nn.Linear, features: torch.Tensor, pool: str) -> list[torch.Tensor]:
    """The top-k pooled logits of each peak term that ``--peak-pool`` names (see PEAK_POOLS)."""
    return [
        classifier(peak_pool(features)) if term == "features" else peak_logits(classifier, features)
        for term in PEAK_POOLS[pool]
    ]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _probe_images(paths: list[str], limit: int = 64) -> tuple[int, int]:
    """(channels, median shorter side) from up to `limit` images spread over the set."""
    picks = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(limit, len(paths)))})
    channels, sides = 1, []
    for i in picks:
        try:
            img = read_image(paths[i])
        except CasebaseError:
            continue
        px = img.pixels
        if px.shape[2] == 3 and not (
            np.allclose(px[..., 0], px[..., 1], atol=1e-3)
            and np.allclose(px[..., 1], px[..., 2], atol=1e-3)
        ):
            channels = 3
        sides.append(min(img.original_size))
    if not sides:
        raise CasebaseError("none of the sampled training images could be read")
    return channels, int(np.median(sides))


def _probe_volumes(paths: list[str], limit: int = 16) -> tuple[int, int]:
    """(median depth, median shorter in-plane side) of up to `limit` volumes spread over the set."""
    from retrieval.data.volume import read_volume

    picks = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(limit, len(paths)))})
    depths, sides = [], []
    for i in picks:
        try:
            shape = read_volume(paths[i]).shape
        except CasebaseError:
            continue
        depths.append(shape[0])
        sides.append(min(shape[1:]))
    if not sides:
        raise CasebaseError("none of the sampled training volumes could be read")
    return int(np.median(depths)), int(np.median(sides))


def default_volume_size(median_depth: int, median_side: int) -> tuple[int, int]:
    """(depth, side) of a cnn3d input: the volumes' median size rounded down to a multiple of 8,
    at most 32 slices x 64 x 64 (2-core training budget), at least 8 x 16 x 16."""
    depth = int(max(8, min(32, (median_depth // 8) * 8)))
    side = int(max(16, min(64, (median_side // 8) * 8)))
    return depth, side


def resolve_backbone(backbone: str, paths: list[str], limit: int = 16) -> str:
    """``auto``: cnn3d when most sampled manifest images are volumes, else compact."""
    if backbone != "auto":
        return backbone
    from retrieval.data.volume import is_volume_path

    picks = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(limit, len(paths)))})
    n_vol = sum(1 for i in picks if is_volume_path(paths[i]))
    return "cnn3d" if picks and n_vol * 2 > len(picks) else "compact"


def default_image_size(median_side: int) -> int:
    """128 px, or the images' own size (rounded down to a multiple of 16, at least 32) if smaller."""
    return int(max(32, min(128, (median_side // 16) * 16)))


def _batch_plan(n_classes: int, target: int) -> tuple[int, int]:
    """(m per class, cases per batch) valid for MPerClassSampler, about ``target`` cases."""
    m = max(2, min(16, target // max(1, min(n_classes, target // 2))))
    classes_per_batch = max(2, min(n_classes, target // m))
    return m, m * classes_per_batch


def default_epochs(n_train: int, volumes: bool = False) -> int:
    """Epochs for ``n_train`` case-views: about SAMPLE_BUDGET in all, 8..40 epochs; for
    volumes at least MIN_VOLUME_EPOCHS."""
    epochs = int(np.clip(math.ceil(SAMPLE_BUDGET / max(1, n_train)), 8, 40))
    return max(epochs, MIN_VOLUME_EPOCHS) if volumes else epochs


def _chance_p1(train_y: torch.Tensor, val_y: torch.Tensor) -> float:
    """Precision@1 of a model that retrieves at random: P(a random train case shares the label)."""
    k = int(max(train_y.max(), val_y.max())) + 1
    pt = torch.bincount(train_y, minlength=k).float() / len(train_y)
    pv = torch.bincount(val_y, minlength=k).float() / len(val_y)
    return float((pt * pv).sum())


@torch.no_grad()
def _embed_all(model: CaseNet, pre: Preprocessor, images: torch.Tensor, device, bs: int = 128):
    model.eval()
    embs, logits = [], []
    for i in range(0, len(images), bs):
        out = model.run(pre.normalize(images[i : i + bs].to(device)), "saliency")
        embs.append(out.embedding.float().cpu())
        logits.append(out.logits.float().cpu())
    return torch.cat(embs), torch.cat(logits)


def _validate(model, pre, train_x, train_y, val_x, val_y, device) -> dict:
    tr_e, _ = _embed_all(model, pre, train_x, device)
    va_e, va_logits = _embed_all(model, pre, val_x, device)
    nn_idx = (va_e @ tr_e.T).argmax(dim=1)
    p1 = float((train_y[nn_idx] == val_y).float().mean())
    pred = va_logits.argmax(1)
    acc = float((pred == val_y).float().mean())
    recalls = [float((pred[val_y == c] == c).float().mean()) for c in val_y.unique()]
    ce = float(F.cross_entropy(va_logits, val_y))
    return {
        "precision_at_1": p1,
        "accuracy": acc,
        "balanced_accuracy": float(np.mean(recalls)),
        "val_ce": ce,
        "score": (p1 + acc) / 2 - 0.01 * ce,
    }


def _split_val(df, seed: int) -> tuple:
    """(train, val, note): the manifest's val split if it is big enough to judge a run by
    (at least max(6, 2 x labels) cases); else ~15 % of the train patients are held out, and
    ``note`` says so. The small val split is then left unseen by training, so that the index
    build can calibrate on it (retrieval.service.conformal.calibration_rows draws the same
    patients the same way: keep the two in step)."""
    val = df[df["split"] == "val"]
    train = df[df["split"] == "train"]
    need = max(6, 2 * df["label"].nunique())
    if len(val) >= need or len(train) == 0:
        return train, val, None
    groups = (
        train["patient_id"]
        if "patient_id" in train and (train["patient_id"] != "").all()
        else train["case_id"]
    )
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(uniq, size=max(1, int(round(0.15 * len(uniq)))), replace=False))
    mask = groups.isin(held)
    note = (
        f"the val split has {len(val)} case(s), fewer than the {need} needed to judge training "
        f"(max(6, 2 x {df['label'].nunique()} labels)), so {int(mask.sum())} train cases of "
        f"{len(held)} patients are held out for validation instead"
        + (
            f"; the {len(val)} val case(s) stay unseen by training (the index build calibrates "
            "on them)"
            if len(val)
            else ""
        )
    )
    return train[~mask], train[mask], note


def train_model(manifest_path: str | Path, out_dir: str | Path, opts: TrainOptions) -> TrainReport:
    t0 = time.time()
    seed_everything(opts.seed)
    if opts.loss not in LOSSES:
        raise CasebaseError(f"unknown loss {opts.loss!r}: choose one of {', '.join(LOSSES)}")
    check_peak_weight(opts)  # before any image is decoded
    device = resolve_device(opts.device)
    manifest = load_manifest(manifest_path)
    df = manifest.select(["train", "val"]).copy()
    if df.empty:
        raise CasebaseError(f"{manifest_path}: no train or val cases to train on")
    df["path"] = [str(manifest.resolve(p)) for p in df["image"]]
    classes = sorted(df["label"].unique().tolist())
    if len(classes) < 2:
        raise CasebaseError(f"{manifest_path}: need at least two labels to train, found {classes}")

    backbone = resolve_backbone(opts.backbone, df["path"].tolist())
    mixed = mixed_dimensions_note(*count_dimensions(df["path"].tolist()))
    if mixed:  # once, before any image is decoded (validate says the same)
        tqdm.write(f"warning: {mixed}")
    depth = 0
    if backbone in VOLUME_BACKBONES:
        channels = 1
        auto_depth, auto_side = default_volume_size(*_probe_volumes(df["path"].tolist()))
        size = opts.image_size or auto_side
        depth = opts.depth or auto_depth
        if size < 16 or size % 8 or depth < 8 or depth % 8:
            raise CasebaseError(
                f"volume input {depth} x {size} x {size}: use multiples of 8, at least 8 slices "
                "and 16 pixels (--depth, --image-size)"
            )
    else:
        if opts.depth:
            raise CasebaseError(f"--depth is for volume backbones (cnn3d), not {backbone}")
        channels, median_side = _probe_images(df["path"].tolist())
        size = opts.image_size or default_image_size(median_side)
        if size < 32 or size % 16:
            raise CasebaseError(f"--image-size {size}: use a multiple of 16, at least 32")
    cfg = ModelConfig(
        classes=classes,
        backbone=backbone,
        in_channels=channels,
        image_size=size,
        depth=depth,
        embedding_dim=opts.embedding_dim,
        width=opts.width or DEFAULT_WIDTH,
        mean=[0.0] * channels,
        std=[1.0] * channels,
    )
    pre = Preprocessor(cfg)

    images, ok, failures = decode_all(
        df["path"].tolist(),
        pre,
        batch_size=64,
        strict=opts.strict,
        num_workers=opts.num_workers,
        desc="decoding",
        progress=opts.progress,
    )
    skipped = [f.message for f in failures]
    for msg in skipped:
        tqdm.write(f"skipped: {msg}")
    if images is None:
        raise CasebaseError("no training image could be read")
    df = df.iloc[ok].reset_index(drop=True)
    # Normalisation statistics from the training pixels themselves.
    flat = images.float().div_(255.0).transpose(0, 1).reshape(channels, -1)
    cfg.mean = flat.mean(dim=1).tolist()
    cfg.std = flat.std(dim=1).clamp_min(1e-3).tolist()
    del flat
    pre = Preprocessor(cfg)

    masks, has_mask, mask_note = _training_masks(df, manifest, size, backbone, opts)
    if mask_note:
        tqdm.write(f"note: {mask_note}")
    cfg.extent_weight = resolve_extent_weight(opts, backbone, has_mask)
    if cfg.extent_weight > 0:
        areas = masks[has_mask].float().mean((1, 2, 3)).div(255.0).numpy()
        cfg.extent_knots = extent.fit_knots(areas)

    train_df, val_df, split_note = _split_val(df, opts.seed)
    if split_note:
        tqdm.write(f"note: {split_note}")
    if train_df["label"].nunique() < 2:
        raise CasebaseError("the training split holds fewer than two labels")
    y_all = torch.tensor([classes.index(v) for v in df["label"]])
    tr_idx, va_idx = torch.tensor(train_df.index.values), torch.tensor(val_df.index.values)
    train_x, train_y = images[tr_idx], y_all[tr_idx]
    val_x, val_y = images[va_idx], y_all[va_idx]

    views = 2 if opts.instance_weight > 0 else 1
    default_cases = (
        DEFAULT_VOLUME_CASES_PER_BATCH if backbone in VOLUME_BACKBONES else DEFAULT_CASES_PER_BATCH
    )
    target_cases = (opts.batch_size // views) if opts.batch_size else default_cases
    m, batch = _batch_plan(len(classes), max(4, target_cases))
    steps_per_epoch = max(1, len(train_x) // batch)
    epochs = opts.epochs or default_epochs(len(train_x) * views, backbone in VOLUME_BACKBONES)
    data = _Data(pre, train_x, train_y, val_x, val_y, m, batch, steps_per_epoch, epochs, views)
    if cfg.extent_weight > 0:
        data.masks, data.has_mask = masks[tr_idx], has_mask[tr_idx]
    # chance levels: a model stuck on a plateau predicts one class and retrieves at random
    val_classes = len(val_y.unique())
    chance = 1.0 / max(1, val_classes)
    chance_p1 = _chance_p1(train_y, val_y) if len(val_y) else 0.0
    attempts: list[dict] = []
    lr, seed = opts.lr, opts.seed
    bar = tqdm(
        total=epochs * steps_per_epoch, desc="training", unit="step", disable=not opts.progress
    )
    for attempt in range(1, MAX_ATTEMPTS + 1):
        last = attempt == MAX_ATTEMPTS
        # a val split holding one class has no chance level to compare with
        judge = not last and epochs >= STALL_MIN_EPOCHS and val_classes >= 2
        guard = (chance, chance_p1) if judge else None
        model, fit = _fit(cfg, data, opts, device, seed, lr, guard, bar)
        attempts.append(
            {"seed": seed, "lr": lr, "epochs_run": fit.epochs_run, "stalled": fit.stalled}
        )
        if not fit.stalled:
            break
        tqdm.write(
            f"training stalled at chance after {fit.epochs_run} of {epochs} epochs (val balanced "
            f"accuracy {fit.last_accuracy:.2f}, chance {chance:.2f}; retrieval precision@1 "
            f"{fit.last_p1:.2f}, chance {chance_p1:.2f}): restarting from a new initialisation "
            f"at half the learning rate ({lr / 2:g})"
        )
        bar.reset(total=epochs * steps_per_epoch)
        lr, seed = lr / 2, seed + 1
    bar.close()
    if val_classes < 2 and len(val_y):
        tqdm.write(
            "note: the val split holds one label, so it cannot show whether the classifier "
            "beats chance; judge the model with `casebase eval` on a test split"
        )
    elif len(val_y) and fit.best_accuracy <= chance + STALL_MARGIN:
        tqdm.write(
            f"warning: the classifier does not beat chance on the val split (balanced accuracy "
            f"{fit.best_accuracy:.2f}, chance {chance:.2f}; retrieval precision@1 "
            f"{fit.best.get('precision_at_1', float('nan')):.2f}, chance {chance_p1:.2f}); "
            "check the labels, or train longer"
        )
    epochs_total = sum(a["epochs_run"] for a in attempts)
    cfg.training = {
        "epochs_run": fit.epochs_run,
        "epochs_total": epochs_total,
        "best_epoch": fit.best_epoch,
        "max_epochs": epochs,
        "batch_size": batch * views,
        "cases_per_batch": batch,
        "views": views,
        "m_per_class": m,
        "lr": lr,
        "seed": seed,
        "n_train": len(train_x),
        "n_val": len(val_x),
        "best_val": fit.best,
        "attempts": attempts,
        "val_chance": chance,
        "val_chance_precision_at_1": chance_p1,
        "loss": _loss_name(opts, backbone),
        "loss_options": {
            "loss": opts.loss,
            "temperature": opts.temperature,
            "instance_weight": opts.instance_weight,
            "instance_temperature": opts.instance_temperature,
            "aug_scale": opts.aug_scale,
            "aug_colour": opts.aug_colour,
            "margin": opts.margin,
            "peak_weight": resolve_peak_weight(opts, backbone),
            "peak_pool": opts.peak_pool,
            "zero_init_residual": opts.zero_init_residual,
            "extent_weight": cfg.extent_weight,
            "extent_loss_weight": opts.extent_loss_weight if cfg.extent_weight > 0 else 0.0,
            "n_masked": int(has_mask.sum()),
        },
    }
    model.config = cfg
    save_model(model.cpu(), out_dir)
    return TrainReport(
        str(out_dir),
        fit.epochs_run,
        fit.best_epoch,
        fit.best,
        len(train_x),
        len(val_x),
        skipped,
        time.time() - t0,
        fit.history,
        attempts,
        epochs,
        epochs_total,
    )


def _training_masks(df, manifest, size: int, backbone: str, opts: TrainOptions):
    """(uint8 masks (N, 1, S, S), bool has_mask (N,), note): the lesion masks of the decoded
    cases at the model's input size, resized as the images are (no crop). Only read when the
    extent head could use them (2-D backbones, extent weight not 0); a mask that cannot be read
    counts as missing and is reported once."""
    n = len(df)
    empty = torch.zeros((n, 1, size, size), dtype=torch.uint8), torch.zeros(n, dtype=torch.bool)
    if backbone in VOLUME_BACKBONES or opts.extent_weight == 0 or "mask" not in df:
        return *empty, None
    from retrieval.data.imageio import read_mask

    masks, has_mask = empty
    bad: list[str] = []
    rows = [(i, p) for i, p in enumerate(df["mask"].fillna("").astype(str)) if p.strip()]
    if len(rows) < EXTENT_MIN_MASKED * n and opts.extent_weight is None:
        return masks, has_mask, None
    for i, p in tqdm(rows, desc="masks", unit="mask", disable=not opts.progress, leave=False):
        try:
            m = torch.from_numpy(read_mask(manifest.resolve(p)).astype(np.float32))
        except CasebaseError as err:
            bad.append(str(err))
            continue
        m = F.interpolate(m[None, None], size=(size, size), mode="area")[0]
        masks[i] = (m * 255).round().to(torch.uint8)
        has_mask[i] = True
    note = None
    if bad:
        note = f"{len(bad)} lesion mask(s) could not be read and are left out (first: {bad[0]})"
    return masks, has_mask, note


def resolve_extent_weight(opts: TrainOptions, backbone: str, has_mask: torch.Tensor) -> float:
    """The extent code's weight: the option, or EXTENT_WEIGHT when enough cases have masks."""
    if opts.extent_weight is not None:
        if opts.extent_weight < 0:
            raise CasebaseError(f"--extent-weight {opts.extent_weight:g}: use 0 or more")
        if opts.extent_weight > 0 and backbone in VOLUME_BACKBONES:
            raise CasebaseError(
                "--extent-weight is for 2-D images; volume models have no extent head"
            )
        if opts.extent_weight > 0 and not bool(has_mask.any()):
            raise CasebaseError(
                "--extent-weight needs lesion masks: no training case has a readable mask"
            )
        return float(opts.extent_weight)
    if backbone in VOLUME_BACKBONES or not len(has_mask):
        return 0.0
    return EXTENT_WEIGHT if float(has_mask.float().mean()) >= EXTENT_MIN_MASKED else 0.0


def check_peak_weight(opts: TrainOptions) -> None:
    if opts.peak_weight is not None and opts.peak_weight < 0:
        raise CasebaseError(f"--peak-weight {opts.peak_weight:g}: use 0 or more")
    if opts.peak_pool not in PEAK_POOLS:
        raise CasebaseError(
            f"--peak-pool {opts.peak_pool!r}: choose one of {', '.join(PEAK_POOLS)}"
        )


def resolve_peak_weight(opts: TrainOptions, backbone: str) -> float:
    check_peak_weight(opts)
    if opts.peak_weight is not None:
        return float(opts.peak_weight)
    return PEAK_WEIGHT if backbone in VOLUME_BACKBONES else 0.0


def _loss_name(opts: TrainOptions, backbone: str = "compact") -> str:
    sup = {
        "supcon": f"supcon(t={opts.temperature:g})",
        "multisimilarity": "multisimilarity",
        "triplet": f"triplet(margin={opts.margin:g}, semihard miner)",
    }[opts.loss]
    text = f"cross_entropy + {sup}(saliency) + {sup}(uniform)"
    peak = resolve_peak_weight(opts, backbone)
    if peak > 0:
        for term in PEAK_POOLS[opts.peak_pool]:
            name = _PEAK_TERM_NAMES[term]
            text += f" + {peak:g} * cross_entropy({name}, top {PEAK_FRACTION:.3g} of cells)"
    if opts.instance_weight > 0:
        text += (
            f" + {opts.instance_weight:g} * ntxent(t={opts.instance_temperature:g}) over two "
            "augmented views of each case (saliency and uniform)"
        )
    return text


@dataclass
class _Data:
    pre: Preprocessor
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    m: int
    batch: int  # cases per step
    steps_per_epoch: int
    epochs: int
    views: int = 1
    masks: torch.Tensor | None = None  # (N, 1, S, S) uint8 training lesion masks (extent head)
    has_mask: torch.Tensor | None = None  # (N,) bool


@dataclass
class _Fit:
    best: dict
    best_epoch: int
    epochs_run: int
    history: list[dict]
    stalled: bool

    @property
    def last_accuracy(self) -> float:
        """Balanced val accuracy of the last epoch run (the state the stall check judges)."""
        return _balanced(self.history[-1]) if self.history else 0.0

    @property
    def last_p1(self) -> float:
        return self.history[-1].get("precision_at_1", 0.0) if self.history else 0.0

    @property
    def best_accuracy(self) -> float:
        return max((_balanced(h) for h in self.history), default=0.0)


def _balanced(metrics: dict) -> float:
    return metrics.get("balanced_accuracy", 0.0)


def is_stalled(metrics: dict, chance: float, chance_p1: float) -> bool:
    """At chance on *both* counts: the head (balanced accuracy) and retrieval (precision@1).

    A run whose retrieval has left chance is learning even if its classifier head has not
    yet (seen: val P@1 0.84 with the head at chance); restarting it would throw that away.
    """
    head_stuck = _balanced(metrics) <= chance + STALL_MARGIN
    retrieval_stuck = metrics.get("precision_at_1", 0.0) <= chance_p1 + STALL_MARGIN
    return head_stuck and retrieval_stuck


class _Criterion:
    """The training loss: CE + a supervised metric loss on both pooled embeddings (+ NT-Xent).

    Why not triplet alone: triplet + CE pulls every class onto one direction (median top-1
    cosine 0.9996 vs top-10 0.9983 on the demo index), so the similarity said "same class"
    and nothing else. A supervised contrastive loss with a temperature keeps classes apart
    without a margin to collapse into, and the instance term (two augmented views of one
    case must find each other among the batch, as in SimCLR) keeps cases of one class apart
    by how they look. bench/depth.py measures the choice.
    """

    def __init__(self, opts: TrainOptions, peak_weight: float = 0.0):
        self.opts = opts
        self.peak_weight = peak_weight
        dist = distances.CosineSimilarity()
        self.miner = None
        if opts.loss == "supcon":
            self.sup = losses.SupConLoss(temperature=opts.temperature)
        elif opts.loss == "multisimilarity":
            self.sup = losses.MultiSimilarityLoss()
            self.miner = miners.MultiSimilarityMiner()
        else:
            self.sup = losses.TripletMarginLoss(margin=opts.margin, distance=dist)
            self.miner = miners.TripletMarginMiner(
                margin=opts.margin, distance=dist, type_of_triplets="semihard"
            )
        self.inst = losses.NTXentLoss(temperature=opts.instance_temperature)

    def supervised(self, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.miner is None:
            return self.sup(e, y)
        return self.sup(e, y, self.miner(e, y))

    def __call__(self, logits, e_sal, e_uni, y, case_ids, peak=()) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), y)
        for pooled in peak:  # the top-k pooled logits of the peak term(s)
            loss = loss + self.peak_weight * F.cross_entropy(pooled.float(), y)
        loss = loss + self.supervised(e_sal, y) + self.supervised(e_uni, y)
        if self.opts.instance_weight > 0:
            w = self.opts.instance_weight
            loss = loss + w * (self.inst(e_sal, case_ids) + self.inst(e_uni, case_ids))
        return loss


def _fit(cfg, d: _Data, opts: TrainOptions, device, seed: int, lr: float, guard, bar):
    """One training schedule from a fresh initialisation; keeps the best val epoch's weights.

    ``guard`` = (balanced-accuracy chance, precision@1 chance), or None: give up as *stalled*
    when, after ``STALL_FRACTION`` of the epochs, the head and retrieval are both still
    within ``STALL_MARGIN`` of chance (see is_stalled). Small lesions on a varied background
    leave a plateau at chance that a run may never leave (seen at lr 2e-3 on the 600-case
    phantom); a new initialisation at half the rate gets out of it.
    """
    seed_everything(seed)
    model = CaseNet(cfg)
    if opts.zero_init_residual:
        zero_init_residuals(model)
    if d.masks is not None:
        extent.init_prior(model.extent_head, d.masks[d.has_mask])
    model = model.to(device)
    sampler = samplers.MPerClassSampler(
        d.train_y.tolist(),
        m=d.m,
        batch_size=d.batch,
        length_before_new_iter=d.steps_per_epoch * d.batch,
    )
    peak_weight = resolve_peak_weight(opts, cfg.backbone)
    criterion = _Criterion(opts, peak_weight)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, max_lr=lr, total_steps=d.epochs * d.steps_per_epoch, pct_start=0.15
    )
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(seed)
    # early stopping waits until the one-cycle rate has come down (half the schedule)
    min_epochs = math.ceil(MIN_EPOCH_FRACTION * d.epochs)
    stall_epoch = max(2, math.ceil(STALL_FRACTION * d.epochs))
    best, best_state, best_epoch, history, stale, stalled = None, None, 0, [], 0, False
    epoch = 0
    for epoch in range(1, d.epochs + 1):
        model.train()
        order = list(iter(sampler))
        running = 0.0
        for s in range(d.steps_per_epoch):
            idx = torch.tensor(order[s * d.batch : (s + 1) * d.batch])
            x = d.train_x[idx].to(device).float() / 255.0
            if x.dim() == 5:
                views = [augment_volume_batch(x, gen, opts.aug_scale) for _ in range(d.views)]
            elif d.masks is not None:
                mk = d.masks[idx].to(device).float() / 255.0
                pairs = [
                    augment_batch(x, gen, opts.aug_scale, opts.aug_colour, masks=mk)
                    for _ in range(d.views)
                ]
                views = [v for v, _ in pairs]
                mb = torch.cat([m for _, m in pairs])
                hb = d.has_mask[idx].to(device).repeat(d.views)
            else:
                views = [
                    augment_batch(x, gen, opts.aug_scale, opts.aug_colour) for _ in range(d.views)
                ]
            xb = torch.cat(views)
            yb = d.train_y[idx].to(device).repeat(d.views)
            case_ids = torch.arange(len(idx), device=device).repeat(d.views)
            with torch.autocast(device.type, enabled=use_amp):
                feats = model.backbone(d.pre.normalize(xb))
                logits = model.classifier(model.pool(feats))
                sal = model.saliency_weights(
                    model.gradcam(feats.float(), logits.argmax(1)).detach()
                )
                uni = torch.full_like(sal, 1.0 / sal[0].numel())
                e_sal = model.embed_features(feats.float(), sal)
                e_uni = model.embed_features(feats.float(), uni)
                peak = (
                    peak_terms(model.classifier, feats, opts.peak_pool) if peak_weight > 0 else []
                )
                loss = criterion(logits, e_sal, e_uni, yb, case_ids, peak)
                if d.masks is not None:
                    fractions = model.lesion_fraction(feats.float())
                    targets = extent.cell_targets(mb, tuple(fractions.shape[1:]))
                    loss = loss + opts.extent_loss_weight * extent.extent_loss(
                        fractions, targets, hb, opts.extent_area_weight
                    )
            optim.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optim)
            scaler.update()
            sched.step()
            running += float(loss.detach())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{running / (s + 1):.3f}")
        if len(d.val_x):
            metrics = _validate(model, d.pre, d.train_x, d.train_y, d.val_x, d.val_y, device)
        else:
            metrics = {"score": -running}
        metrics.update(epoch=epoch, loss=running / d.steps_per_epoch)
        history.append(metrics)
        bar.set_postfix(
            epoch=epoch,
            loss=f"{metrics['loss']:.3f}",
            val_p1=f"{metrics.get('precision_at_1', float('nan')):.3f}",
        )
        if best is None or metrics["score"] > best["score"] + 1e-4:
            best, best_epoch, stale = metrics, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        if guard is not None and epoch == stall_epoch:
            stalled = is_stalled(metrics, *guard)
            if stalled:
                break
        if stale >= opts.patience and epoch >= min_epochs:
            break
    model.load_state_dict(best_state)
    return model, _Fit(best, best_epoch, epoch, history, stalled)
