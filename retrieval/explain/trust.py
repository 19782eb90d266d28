"""How far can each explanation method be trusted? Measured on cases with lesion masks.

For every method, on a split's cases that have a ground-truth ``mask``, the
query map (what ``casebase query --explain`` shows for the query: the
predicted class, or for ``similarity`` the similarity-weighted mean of the
neighbours' decomposition maps) is scored by:

* **pointing game** (Zhang et al. 2016): is the map's maximum on the lesion?
  ``pointing_game`` allows a tolerance of half a feature-map cell (the mask
  dilated by a square of that half-width, in original pixels: 8 px for the
  default 128-px stride-16 model on 128-px images). A map cannot place its peak
  more finely than a cell, and with this tolerance a peak counts exactly when
  the cell it lies in touches the lesion. ``pointing_game_strict`` uses the
  mask as is. Tied maxima (flat superpixel / occlusion maps) score the share
  of tied pixels that hit, i.e. the expected score of a random tie-break.
* **mask energy**: the share of the map's positive mass inside the lesion,
  with ``mask_area`` (the lesion's share of the image) as the chance level.
* **deletion / insertion AUC** (Petsiuk et al. 2018): pixels are replaced in
  the map's order, most important first, in ``CURVE_STEPS`` = 16 equal steps,
  by a Gaussian-blurred copy of the image (σ = ``BLUR_FRACTION`` × side; the
  same blur for both curves, so no method's own baseline, e.g. the dataset
  mean of occlusion / IG / LIME, is favoured); the curve is the predicted
  class's probability (softmax), the AUC its trapezoid mean over the removed
  fraction. Deletion: lower is better; insertion: higher is better. The same
  curves for a random pixel order (seeded; shared by all methods) are the
  reference, and ``deletion_gain`` = random − map and ``insertion_gain`` =
  map − random (both > 0 when the method beats chance).
  For ``similarity`` (with neighbours) the curves score what the map explains:
  the similarity-weighted mean cosine similarity to the neighbours (the random
  reference on the same score); ``curve_score`` says which.
* **faithfulness verdict**: "faithful" only when the 95 % percentile-bootstrap
  CI over cases (``BOOTSTRAP`` resamples) of the deletion gain excludes 0 and
  the mean gain is at least ``MIN_FAITHFUL_GAIN`` (0.01 of the score's range:
  a model whose score no deletion moves gives gains of +0.000 with a CI that
  excludes 0 by rounding); otherwise "not faithful on this data"
  (``deletion_gain_ci95``). Every summary
  states the number of cases it rests on.
* **faithfulness correlation** and **max-sensitivity** (Quantus's metrics,
  retrieval.explain.fidelity): do the map's magnitudes predict the score drop of
  random pixel subsets (Pearson r, higher is better), and how far does the map
  move under small input noise (lower is better; on the sanity cases)?
* **sanity checks** (Adebayo et al. 2018; retrieval.explain.sanity): cascading
  and independent per-block randomisation over 3 seeds, Spearman of absolute
  and signed values, SSIM and HOG similarity; ``sanity`` holds the curves,
  ``sanity_check`` the verdict ("pass" / "fail"; a constant or empty map
  fails), ``randomization_*`` the values with every block randomised. They run
  on ``sanity_cases`` evenly spaced cases (each step re-explains every case).
* **neighbour tests** (Hanawa et al. 2021, report-level ``neighbour_tests``):
  model randomisation, identical class, identical subclass (``subclass``).

Each method's entry also carries ``by_label`` (pointing game and mask energy
per class): a model can be right for the right reason on one class and not on
another (on the phantom, nodules are recognised partly by the absence of mass
and cavity features, and every faithful method then points off the nodule).

Maps come from the registry's explainers with the same sample counts a query
uses, so the numbers describe what users see; ``seconds_per_map`` is the
wall time of one query map from the trained model.

A volume model (cnn3d, slices) is measured the same way on voxels
(retrieval.explain.volume_trust): the 3-D pointing game with a tolerance of half
a feature-volume cell per axis, the curves with a 3-D blur and a voxel order, the
sanity checks on the 3-D maps (HOG on the axial slices); its entries carry
``dimensions`` 3 and ``not_measured`` (what images get and volumes do not: now
nothing).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from retrieval.errors import CasebaseError
from retrieval.explain import fidelity, registry, sanity
from retrieval.explain.methods import family_of
from retrieval.explain.pipeline import weighted_query_map
from retrieval.explain.registry import ScoreTarget, resize_maps

CURVE_STEPS = 16
BLUR_FRACTION = 1 / 16
SANITY_THRESHOLD = sanity.SANITY_THRESHOLD
RANDOM_SEED = 0
BOOTSTRAP = 2000
SIMILARITY_NEIGHBORS = 5


# ---------------------------------------------------------------- map scores
def pointing_game(
    heat: np.ndarray, mask: np.ndarray, tolerance: int | tuple[int, int] = 0
) -> float:
    """1 if the map's maximum lies in the mask dilated by ``tolerance`` (rows, cols) px
    ((slices, rows, cols) voxels for a volume's (D, H, W) map and mask).

    Tied maxima score the share of them that hit (a random tie-break's expected score).
    """
    heat = np.nan_to_num(np.asarray(heat, np.float64))
    mask = np.asarray(mask, bool)
    if heat.shape != mask.shape:
        raise ValueError(f"map {heat.shape} and mask {mask.shape} differ in size")
    # one tolerance per axis: (rows, cols), or (slices, rows, cols) for a volume
    tol = (tolerance,) * heat.ndim if isinstance(tolerance, int) else tuple(tolerance)
    if any(t > 0 for t in tol):
        mask = ndimage.binary_dilation(mask, structure=np.ones([2 * t + 1 for t in tol], bool))
    top = heat >= heat.max() - 1e-12 * max(1.0, abs(float(heat.max())))
    return float(mask[top].mean())


def read_case_mask(path, geometry) -> np.ndarray:
    """A case's lesion mask in its original size: (H, W) for an image, (D, H, W) for a volume."""
    size = tuple(geometry.original_size)
    if len(size) == 3:
        from retrieval.data.volume import read_volume_mask

        return read_volume_mask(path, expected_shape=size)
    from retrieval.data.imageio import read_mask

    return read_mask(path, expected_size=size)


def mask_energy(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's positive mass inside the mask (0 for a map with no positive mass)."""
    pos = np.clip(np.nan_to_num(np.asarray(heat, np.float64)), 0.0, None)
    total = pos.sum()
    return float(pos[np.asarray(mask, bool)].sum() / total) if total > 0 else 0.0


def auc(curve: Sequence[float]) -> float:
    """Trapezoid mean of a curve sampled at equal steps over [0, 1]."""
    c = np.asarray(curve, np.float64)
    return float((c[:-1] + c[1:]).sum() / (2 * (len(c) - 1)))


def unit_scale(heat: np.ndarray) -> np.ndarray:
    h = np.nan_to_num(np.asarray(heat, np.float64))
    lo, hi = h.min(), h.max()
    return np.zeros_like(h) if hi - lo < 1e-12 else (h - lo) / (hi - lo)


def rank_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Spearman ρ, SSIM) between two maps of one shape; ρ = 0 where a map is constant."""
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    a, b = np.nan_to_num(np.asarray(a, np.float64)), np.nan_to_num(np.asarray(b, np.float64))
    if a.std() < 1e-12 or b.std() < 1e-12:
        rho = 0.0
    else:
        rho = float(spearmanr(a.ravel(), b.ravel()).statistic)
    ssim = float(structural_similarity(unit_scale(a), unit_scale(b), data_range=1.0))
    return (0.0 if math.isnan(rho) else rho), ssim


# ---------------------------------------------------------------- curves
def blurred(
    x: torch.Tensor, fraction: float = BLUR_FRACTION, spatial: int | None = None
) -> torch.Tensor:
    """The input Gaussian-blurred along its last ``spatial`` axes, σ = fraction × that axis's
    length (at least 0.5), each channel on its own.

    (C, S, S) -> the image blurred in plane; a volume (C, D, H, W) or a batch of one
    (1, C, D, H, W) -> blurred along (D, H, W) (a 3-D Gaussian). ``spatial`` defaults to
    every axis after the first, at most three; a batch of images (B, C, S, S) needs
    ``spatial=2``."""
    spatial = min(3, x.ndim - 1) if spatial is None else spatial
    lead = x.ndim - spatial
    sigma = [0.0] * lead + [max(0.5, fraction * n) for n in x.shape[lead:]]
    arr = x.detach().cpu().numpy()
    out = ndimage.gaussian_filter(arr, sigma, mode="nearest")
    return torch.from_numpy(np.ascontiguousarray(out)).to(x)


def pixel_order_ranks(heat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank of every pixel in descending map order (ties broken at random)."""
    flat = np.nan_to_num(np.asarray(heat, np.float64)).ravel()
    order = np.lexsort((rng.random(flat.size), -flat))
    ranks = np.empty(flat.size, np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(np.shape(heat))


@torch.no_grad()
def perturbation_curves(
    model,
    x: torch.Tensor,
    cls: int,
    ranks: np.ndarray,
    baseline: torch.Tensor,
    steps: int = CURVE_STEPS,
    score=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(deletion, insertion) probabilities of class ``cls`` at steps+1 removed fractions 0..1.

    ``x`` and ``baseline``: (C, S, S), or (C, D, H, W) for a volume; ``ranks``: the rank of
    every pixel (voxel) in removal order, of x's spatial shape. ``score(batch) -> (n,)``
    replaces the class probability (``similarity`` is scored on the similarity it explains)."""
    n = ranks.size
    counts = torch.from_numpy(np.round(np.linspace(0, n, steps + 1)).astype(np.int64))
    counts = counts.view(-1, *([1] * ranks.ndim))
    hidden = torch.from_numpy(ranks)[None] < counts  # (steps+1, *spatial)
    hidden = hidden[:, None].to(x.device)
    deletion = torch.where(hidden, baseline[None], x[None])
    insertion = torch.where(hidden, x[None], baseline[None])
    probs = []
    for chunk in torch.cat([deletion, insertion]).split(registry.FORWARD_BATCH):
        if score is not None:
            probs.append(score(chunk).float())
        else:
            probs.append(model(chunk).float().softmax(1)[:, cls])
    p = torch.cat(probs).cpu().numpy()
    return p[: steps + 1], p[steps + 1 :]


# ---------------------------------------------------------------- maps
def randomized_copy(model, seed: int = RANDOM_SEED):
    """A copy of the model with every layer re-initialised (seeded), BN statistics reset."""
    rnd = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in rnd.modules():
            if mod is not rnd and hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    return rnd.eval()


def query_map(
    model,
    name: str,
    explainer,
    x: torch.Tensor,
    cls: int,
    weighting: str,
    neighbours: torch.Tensor | None = None,
) -> torch.Tensor:
    """The query-level map a query shows: (h, w) or (S, S) for input x (1, C, S, S)."""
    if name == "similarity" and neighbours is not None and len(neighbours):
        with torch.no_grad():
            eq = model.run(x, weighting).embedding[0]
            ec = model.run(neighbours, weighting).embedding
        maps = explainer.attribute(
            model, x.expand(len(ec), *x.shape[1:]), ScoreTarget.for_similarity(ec, weighting)
        )
        return torch.from_numpy(weighted_query_map(registry.finite(maps), (ec @ eq).tolist()))
    target = ScoreTarget.for_classes([cls], model.config.output_dim, weighting, device=x.device)
    return torch.from_numpy(registry.finite(explainer.attribute(model, x, target))[0])


# ---------------------------------------------------------------- the evaluation
@dataclass
class _Acc:
    pointing: list
    strict: list
    energy: list
    area: list
    deletion: list
    deletion_random: list
    insertion: list
    insertion_random: list
    seconds: list
    labels: list
    faithcorr: list
    sensitivity: list

    @classmethod
    def new(cls) -> _Acc:
        return cls(*([] for _ in range(12)))


def _mean(v: list) -> float:
    return float(np.mean(v)) if v else float("nan")


def _nanmean(v: list) -> float:
    v = [x for x in v if not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, n_boot: int = BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over cases (NaN for fewer than 2 cases)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


MIN_FAITHFUL_GAIN = 0.01  # mean deletion gain below this is no effect, whatever its CI


def faithfulness_verdict(gains: Sequence[float], seed: int = 0) -> tuple[str, list[float]]:
    """ "faithful" when the 95 % bootstrap CI of the deletion gain (random − map) excludes 0
    and the mean gain reaches MIN_FAITHFUL_GAIN (an effect, not a rounding-level excess)."""
    lo, hi = bootstrap_ci(gains, seed=seed)
    mean = float(np.mean(gains)) if len(gains) else float("nan")
    verdict = "faithful" if lo > 0 and mean >= MIN_FAITHFUL_GAIN else "not faithful on this data"
    return verdict, [lo, hi]


def summary_line(m: dict) -> str:
    if m["sanity_check"] in ("pass", "fail"):
        sanity = (
            "passes" if m["sanity_check"] == "pass" else "FAILS"
        ) + " the randomisation sanity check"
    else:
        sanity = "randomisation sanity check not run"
    s = m.get("sanity") or {}
    if s:
        sanity += f" ({s['n_cases']} cases x {len(s['seeds'])} seeds)"
    faithful = m.get("faithfulness", "")
    lo, hi = m.get("deletion_gain_ci95", [float("nan")] * 2)
    if faithful:
        faithful = (
            f"; {faithful} (deletion gain over a random order {m['deletion_gain']:+.3f}, "
            f"95% CI {lo:+.3f} to {hi:+.3f})"
        )
    if m.get("dimensions") == 3:
        return (
            f"on {m['n_cases']} volumes: on the lesion {m['pointing_game']:.0%} of the time "
            f"(3-D pointing game, tolerance half a feature-volume cell; strict "
            f"{m['pointing_game_strict']:.0%}), {m['mask_energy']:.0%} of its energy inside the "
            f"lesion (which is {m['mask_area']:.0%} of the volume), {sanity}{faithful}"
        )
    return (
        f"on {m['n_cases']} cases: on the lesion {m['pointing_game']:.0%} of the time "
        f"(pointing game), {m['mask_energy']:.0%} of its energy inside the lesion (which is "
        f"{m['mask_area']:.0%} of the image), {sanity}{faithful}"
    )


def _similarity_score(fast, x, nbrs, weighting):
    """score(batch) = the similarity-weighted mean cosine to the neighbours (what the
    ``similarity`` query map explains), or None without neighbours."""
    if nbrs is None or not len(nbrs):
        return None
    with torch.no_grad():
        eq = fast.run(x, weighting).embedding[0]
        ec = fast.run(nbrs, weighting).embedding
    w = (ec @ eq).clamp_min(0)
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(w))

    def score(batch):
        return fast.run(batch, weighting).embedding @ ec.T @ w

    return score


def evaluate_cases(
    model,
    cases: list[dict],
    explainers: dict,
    weighting: str = "saliency",
    progress: bool = True,
    seed: int = RANDOM_SEED,
    sanity_cases: int = sanity.SANITY_CASES,
    sanity_seeds: Sequence[int] = sanity.SEEDS,
    data_randomized=None,
) -> dict:
    """Score explainers on prepared cases.

    Each case: ``{"x": (C, S, S) normalised tensor, "mask": (H, W) bool, "geometry": Geometry,
    "neighbours": (K, C, S, S) tensor or None}``; for a volume model ``x`` is (C, D, H, W),
    the mask (D, H, W) of the original volume, the geometry a Geometry3D and every measure
    runs on voxels (retrieval.explain.volume_trust). Returns ``{name: metrics}``.
    The sanity checks (retrieval.explain.sanity) run on ``sanity_cases`` evenly spaced
    cases over ``sanity_seeds``.
    """
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    fast = registry.inference_model(model)  # same function, Conv+BN folded: for the curves
    stride = getattr(model.backbone, "stride", 16)
    acc = {name: _Acc.new() for name in explainers}
    for i, case in enumerate(tqdm(cases, desc="explain-eval", unit="case", disable=not progress)):
        x = case["x"].to(device)[None]
        mask = np.asarray(case["mask"], bool)
        geo = case["geometry"]
        nbrs = case.get("neighbours")
        nbrs = None if nbrs is None else nbrs.to(device)
        size = tuple(x.shape[2:])  # (S, S), or (D, H, W) for a volume
        with torch.no_grad():  # the forward, keeping the feature grid (the 3-D tolerance)
            feats = fast.backbone(x)
            cls = int(fast.classifier(fast.pool(feats)).argmax(1)[0])
        tol = pointing_tolerance(geo, tuple(feats.shape[2:]), stride)
        case["_cls"] = cls
        base = blurred(x[0])
        rng = np.random.default_rng(seed + i)
        random_ranks = pixel_order_ranks(rng.random(size), rng)
        rand_del, rand_ins = perturbation_curves(fast, x[0], cls, random_ranks, base)
        sim_score = _similarity_score(fast, x, nbrs, weighting)
        for name, explainer in explainers.items():
            a = acc[name]
            t0 = time.perf_counter()
            heat = query_map(model, name, explainer, x, cls, weighting, nbrs)
            a.seconds.append(time.perf_counter() - t0)
            full = geo.map_to_original(heat.numpy())
            a.pointing.append(pointing_game(full, mask, tol))
            a.strict.append(pointing_game(full, mask, 0))
            a.energy.append(mask_energy(full, mask))
            a.area.append(float(mask.mean()))
            a.labels.append(str(case.get("label", "")))
            h_in = resize_maps(heat[None], size)[0].numpy()
            score = sim_score if name == "similarity" else None
            d, ins = perturbation_curves(
                fast, x[0], cls, pixel_order_ranks(h_in, rng), base, score=score
            )
            if score is not None:  # the random reference on the same score
                rd, ri = perturbation_curves(fast, x[0], cls, random_ranks, base, score=score)
            else:
                rd, ri = rand_del, rand_ins
            a.faithcorr.append(
                fidelity.faithfulness_correlation(
                    score or (lambda b, c=cls: fast(b).float().softmax(1)[:, c]),
                    x[0],
                    h_in,
                    base,
                    seed=seed + i,
                )
            )
            a.deletion.append(auc(d))
            a.insertion.append(auc(ins))
            a.deletion_random.append(auc(rd))
            a.insertion_random.append(auc(ri))

    picks = [cases[j] for j in _pick(len(cases), sanity_cases)]

    def qmap(mdl, name, case):
        x = case["x"].to(device)[None]
        nbrs = case.get("neighbours")
        nbrs = None if nbrs is None else nbrs.to(device)
        heat = query_map(mdl, name, explainers[name], x, case["_cls"], weighting, nbrs)
        return resize_maps(heat[None], tuple(x.shape[2:]))[0].numpy()

    for j, case in enumerate(tqdm(picks, desc="max-sensitivity", disable=not progress)):
        for name in explainers:
            x0 = case["x"].to(device)[None]

            def explain(xp, name=name, case=case):
                return torch.from_numpy(qmap(model, name, {**case, "x": xp[0]}))

            acc[name].sensitivity.append(fidelity.max_sensitivity(explain, x0, seed=seed + j))

    checks = (
        sanity.sanity_checks(
            model,
            picks,
            list(explainers),
            qmap,
            seeds=sanity_seeds,
            progress=progress,
            data_randomized=data_randomized,
        )
        if picks
        else {}
    )
    out = {}
    for name, a in acc.items():
        chk = checks.get(name)
        full = (chk or {}).get("full_randomization", {})
        gains = [r - d for r, d in zip(a.deletion_random, a.deletion, strict=True)]
        faithful, ci = faithfulness_verdict(gains, seed)
        m = {
            "family": family_of(name),
            "pointing_game": _mean(a.pointing),
            "pointing_game_strict": _mean(a.strict),
            "mask_energy": _mean(a.energy),
            "mask_area": _mean(a.area),
            "deletion_auc": _mean(a.deletion),
            "deletion_auc_random": _mean(a.deletion_random),
            "insertion_auc": _mean(a.insertion),
            "insertion_auc_random": _mean(a.insertion_random),
            "curve_score": "similarity to the neighbours"
            if name == "similarity" and any(c.get("neighbours") is not None for c in cases)
            else "predicted-class probability",
            "randomization_spearman": full.get("spearman", float("nan")),
            "randomization_spearman_abs": full.get("spearman_abs", float("nan")),
            "randomization_ssim": full.get("ssim", float("nan")),
            "randomization_hog": full.get("hog", float("nan")),
            "sanity_check": chk["verdict"] if chk else "not run",
            "sanity": chk or {},
            "n_cases": len(a.pointing),
            "seconds_per_map": _mean(a.seconds),
            "faithfulness": faithful,
            "deletion_gain_ci95": ci,
            # Quantus metrics (retrieval.explain.fidelity)
            "faithfulness_correlation": _nanmean(a.faithcorr),
            "faithfulness_correlation_ci95": list(
                bootstrap_ci([v for v in a.faithcorr if not math.isnan(v)], seed=seed)
            ),
            "max_sensitivity": _nanmean(a.sensitivity),
            "max_sensitivity_n_cases": len(a.sensitivity),
        }
        m["by_label"] = {
            lab: {
                "n": sum(1 for v in a.labels if v == lab),
                "pointing_game": _mean(
                    [p for p, v in zip(a.pointing, a.labels, strict=True) if v == lab]
                ),
                "mask_energy": _mean(
                    [e for e, v in zip(a.energy, a.labels, strict=True) if v == lab]
                ),
            }
            for lab in sorted(set(a.labels))
            if lab
        }
        m["deletion_gain"] = m["deletion_auc_random"] - m["deletion_auc"]
        m["insertion_gain"] = m["insertion_auc"] - m["insertion_auc_random"]
        m["summary"] = summary_line(m)
        out[name] = m
    return out


def pointing_tolerance(geo, grid: tuple[int, ...], stride: int) -> tuple[int, ...]:
    """Half a feature-map cell in original pixels, (rows, cols); for a volume's (d, h, w)
    feature grid half a feature-volume cell along (slices, rows, cols)."""
    if len(grid) == 3:
        from retrieval.explain.volume_trust import tolerance

        return tolerance(geo, grid)
    sx, sy = geo.scale
    return (math.ceil(stride / 2 * sy), math.ceil(stride / 2 * sx))


def _pick(n: int, k: int | None) -> list[int]:
    """k evenly spaced positions out of n (all when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    if k < 1:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def load_cases(
    retriever,
    manifest_path,
    split: str = "test",
    max_cases: int | None = 40,
    with_neighbours: bool = True,
    k: int = SIMILARITY_NEIGHBORS,
) -> tuple[list[dict], list[str]]:
    """The split's cases with a non-empty mask, preprocessed, with their top-k index neighbours."""
    from index.builder import case_table
    from retrieval.data.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    df = manifest.select([split])
    if df.empty:
        raise CasebaseError(f"{manifest_path}: no cases in split {split!r}")
    table = case_table(manifest, df)
    table = table[table["mask"].str.len() > 0].reset_index(drop=True)
    if table.empty:
        raise CasebaseError(
            f"{manifest_path}: no case in split {split!r} has a mask "
            "(the manifest's `mask` column); explain-eval needs lesion masks"
        )
    # a neighbour's attributes as the manifest has them, where the index lacks a column
    # (e.g. a subclass column added to the manifest after the index was built)
    everyone = manifest.df.drop_duplicates("case_id").set_index("case_id", drop=False)
    extra = [c for c in everyone.columns if c not in ("image", "mask")]

    def neighbour_attributes(n) -> dict[str, str]:
        out = {}
        if n.case_id in everyone.index:
            r = everyone.loc[n.case_id]
            out = {c: str(r[c]) for c in extra}
        out.update({a: str(v) for a, v in n.attributes.items()})
        return out

    skipped: list[str] = []
    cases: list[dict] = []
    for pos in _pick(len(table), max_cases):
        row = table.iloc[pos]
        try:
            ctx = retriever.encode(row["image"])
            mask = read_case_mask(row["mask"], ctx.geometry)
        except CasebaseError as err:
            skipped.append(f"{row['case_id']}: {err}")
            continue
        if not mask.any():
            skipped.append(f"{row['case_id']}: empty mask")
            continue
        nbrs = None
        lesion, found = [], []
        if with_neighbours:
            hits = retriever.search(
                ctx.embedding.float().cpu().numpy(),
                k,
                exclude_patient=row.get("patient_id") or None,
            )[0]
            nbs = [retriever.neighbor(s, r) for s, r in hits]
            ctxs = retriever._neighbor_contexts(nbs)
            ok = [c for c in ctxs if c is not None]
            nbrs = torch.stack([c.tensor for c in ok]) if ok else None
            lesion = lesion_pair_shares(retriever, ctx, mask, nbs, ctxs)
            found = [n for n, c in zip(nbs, ctxs, strict=True) if c is not None]
        cases.append(
            {
                "case_id": row["case_id"],
                "label": row["label"],
                "x": ctx.tensor,
                "mask": mask,
                "geometry": ctx.geometry,
                "neighbours": nbrs,
                "lesion_x_lesion": lesion,
                # for Hanawa et al.'s neighbour tests (neighbour_tests)
                "patient_id": str(row.get("patient_id") or ""),
                "attributes": {c: str(row[c]) for c in row.index if c not in ("image", "mask")},
                "neighbour_info": [
                    {
                        "label": n.label,
                        "patient_id": str(n.patient_id),
                        "attributes": neighbour_attributes(n),
                    }
                    for n in found
                ],
            }
        )
    return cases, skipped


def lesion_pair_shares(retriever, q, q_mask, neighbours, contexts) -> list[dict]:
    """Per neighbour with a lesion mask: the share of the similarity in lesion x lesion cells.

    The similarity decomposition's terms between the query's lesion cells and the case's
    (cells whose footprint holds any lesion pixel), over the similarity; ``chance`` is the
    share a decomposition spread evenly over all cell pairs would give (the product of the two
    lesion-cell fractions).
    """
    from retrieval.explain.similarity import cell_mask_share, decompose, lesion_cells

    out = []
    lq = lesion_cells(q_mask, q.geometry, q.grid)
    for nb, c in zip(neighbours, contexts, strict=True):
        path = str(retriever.cases.at[nb.row, "mask"]) if "mask" in retriever.cases else ""
        if c is None or not path:
            continue
        try:
            c_mask = read_case_mask(path, c.geometry)
        except CasebaseError:
            continue
        if not c_mask.any():
            continue
        lc = lesion_cells(c_mask, c.geometry, c.grid)
        dec = decompose(retriever.model, q.features, q.weights, c.features, c.weights)
        out.append(
            {
                "share": cell_mask_share(dec, lq, lc),
                "chance": float(lq.mean() * lc.mean()),
            }
        )
    return out


def lesion_summary(cases: list[dict]) -> dict:
    """Median / mean lesion x lesion share of the similarity over all pairs, and per class."""
    pairs = [(c["label"], p) for c in cases for p in c.get("lesion_x_lesion", [])]
    if not pairs:
        return {"n_pairs": 0}
    shares = np.array([p["share"] for _, p in pairs])
    out = {
        "median_share": float(np.median(shares)),
        "mean_share": float(shares.mean()),
        "median_chance": float(np.median([p["chance"] for _, p in pairs])),
        "n_pairs": len(pairs),
        "n_queries": sum(1 for c in cases if c.get("lesion_x_lesion")),
        "by_label": {},
        "definition": "share of the similarity in the decomposition's terms between the query's "
        "and the neighbour's lesion cells (cells touching the mask), top-"
        f"{SIMILARITY_NEIGHBORS} neighbours with a mask; chance: product of the lesion-cell "
        "fractions",
    }
    for lab in sorted({lab for lab, _ in pairs}):
        v = [p["share"] for lb, p in pairs if lb == lab]
        out["by_label"][lab] = {"median_share": float(np.median(v)), "n_pairs": len(v)}
    return out


def evaluate(
    retriever,
    manifest_path,
    split: str = "test",
    methods: Sequence[str] | None = None,
    max_cases: int | None = 40,
    progress: bool = True,
    seed: int = RANDOM_SEED,
    sanity_cases: int = sanity.SANITY_CASES,
    sanity_seeds: Sequence[int] = sanity.SEEDS,
    data_randomization_epochs: int = 0,
    subclass: str | None = None,
) -> dict:
    """The explain-eval report: ``{"methods": {name: metrics}, "split", "n_cases", ...}``.

    ``data_randomization_epochs`` > 0 adds Adebayo et al.'s data-randomisation test (a
    model trained that many epochs on the train split with permuted labels);
    ``subclass`` names a manifest column for Hanawa et al.'s identical-subclass test.

    A volume model (cnn3d, slices) gets the same measures on voxels, by default for the
    cheap methods only, with the 3-D additions of retrieval.explain.volume_trust."""
    volume = bool(getattr(retriever.model, "is_volume", False))
    if methods:
        names = registry.check_names(list(methods))
    else:
        names = _volume_trust().DEFAULT_METHODS if volume else list(registry.METHODS)
    if len(sanity_seeds) < 1:
        raise CasebaseError("the sanity check needs at least one seed")
    cases, skipped = load_cases(retriever, manifest_path, split, max_cases, True)
    if not cases:
        raise CasebaseError(
            f"no case with a readable {'volume' if volume else 'image'} and a non-empty mask: "
            + "; ".join(skipped[:5])
        )
    if subclass is not None and subclass not in cases[0]["attributes"]:
        raise CasebaseError(
            f"--subclass {subclass!r}: no such manifest column "
            f"(have: {', '.join(sorted(cases[0]['attributes']))})"
        )
    data_model, data_info = None, None
    if data_randomization_epochs > 0:
        data_model, data_info = _permuted_label_model(
            retriever, manifest_path, data_randomization_epochs, seed, progress
        )
    results = evaluate_cases(
        retriever.model,
        cases,
        {n: registry.get(n) for n in names},
        retriever.weighting,
        progress,
        seed,
        sanity_cases=sanity_cases,
        sanity_seeds=sanity_seeds,
        data_randomized=data_model,
    )
    for m in results.values():
        m["split"] = split
    lesion = lesion_summary(cases)
    if "similarity" in results and lesion.get("n_pairs"):
        results["similarity"]["lesion_x_lesion_share"] = lesion["median_share"]
        results["similarity"]["lesion_x_lesion_chance"] = lesion["median_chance"]
    report = {
        "methods": results,
        "similarity_lesion_share": lesion,
        "split": split,
        "n_cases": len(cases),
        "skipped": skipped,
        "neighbour_tests": neighbour_tests(retriever, cases, subclass, seed),
        "data_randomization": data_info,
        "settings": {
            "pointing_tolerance": "half a feature-map cell",
            # the block the CAM methods look at (the last one, except on the cnn3d)
            "cam_layer": f"backbone.features.{retriever.model.cam_index}",
            "curve_steps": CURVE_STEPS,
            "curve_baseline": f"gaussian blur, sigma = {BLUR_FRACTION:g} x side",
            "curve_score": "predicted-class probability",
            "sanity_threshold_abs_spearman": SANITY_THRESHOLD,
            "sanity_cases": min(sanity_cases, len(cases)),
            "sanity_seeds": list(sanity_seeds),
            "faithfulness": "deletion gain over a random order, 95% bootstrap CI over cases "
            f"({BOOTSTRAP} resamples) must exclude 0",
            "random_seed": seed,
            "faithfulness_correlation": f"{fidelity.FAITHCORR_RUNS} random subsets of "
            f"{fidelity.FAITHCORR_FRACTION:g} of the pixels replaced by the blurred copy; Pearson r "
            "of the map's sum on the subset vs the drop in the curve's score",
            "max_sensitivity": f"max over {fidelity.SENSITIVITY_SAMPLES} draws of uniform noise "
            f"+-{fidelity.SENSITIVITY_RADIUS:g} (normalised input units) of "
            "||map(x+noise) - map(x)|| / ||map(x)|| (captum sensitivity_max), on the sanity cases",
            "weighting": retriever.weighting,
            "reference_class": retriever.reference_class,
            "class_score_explained": "logit"
            if retriever.reference_class is None
            else f"logit minus the logit of {retriever.reference_class!r} (--reference-class)",
            # how maps over feature cells (CAM family, similarity) reach the pixels
            "cell_maps_upsampled": "each cell at its receptive field's centre",
            "samples": {
                "smoothgrad": registry.SMOOTHGRAD_SAMPLES,
                "integrated_gradients_steps": registry.IG_STEPS,
                "lime": registry.LIME_SAMPLES,
                "lime_segments": registry.LIME_SEGMENTS,
                "occlusion_window": f"{registry.OCCLUSION_WINDOW:g} x side, stride half",
            },
        },
    }
    return _volume_trust().annotate(report) if volume else report


def _volume_trust():
    from retrieval.explain import volume_trust

    return volume_trust


def neighbour_tests(retriever, cases: list[dict], subclass: str | None, seed: int) -> dict:
    """Hanawa et al.'s minimal tests for the neighbours (retrieval.explain.sanity): each
    evaluated case against the pool of all evaluated cases' retrieved neighbours, under
    the trained and a fully randomised model (same-patient pairs excluded)."""
    pool, info = [], []
    for c in cases:
        if c.get("neighbours") is not None:
            pool.append(c["neighbours"])
            info.extend(c.get("neighbour_info", []))
    if not pool or len(info) != sum(len(p) for p in pool):
        return {}
    if subclass and not any(n["attributes"].get(subclass) for n in info):
        raise CasebaseError(
            f"--subclass {subclass}: no retrieved neighbour has a value in that column "
            "(neither in the index nor in the manifest)"
        )
    model, w = retriever.model, retriever.weighting
    device = next(model.parameters()).device
    rnd = randomized_copy(model, seed)

    def embedder(m):
        fast = registry.inference_model(m)
        return lambda t: torch.cat(
            [fast.run(b.to(device), w).embedding for b in t.split(registry.FORWARD_BATCH)]
        )

    queries = torch.stack([c["x"] for c in cases])
    with torch.no_grad():
        fast = registry.inference_model(model)
        logits = torch.cat([fast(b.to(device)) for b in queries.split(registry.FORWARD_BATCH)])
    classes = model.config.classes
    predicted = [classes[i] for i in logits.argmax(1).tolist()]
    same = np.array(
        [
            [bool(c["patient_id"]) and c["patient_id"] == n["patient_id"] for n in info]
            for c in cases
        ]
    )
    out = sanity.neighbour_tests(
        embedder(model),
        embedder(rnd),
        queries,
        torch.cat(pool),
        [c["label"] for c in cases],
        [n["label"] for n in info],
        predicted,
        [c["attributes"].get(subclass, "") for c in cases] if subclass else None,
        [n["attributes"].get(subclass, "") for n in info] if subclass else None,
        same,
    )
    if subclass:
        out["subclass_column"] = subclass
    return out


def _permuted_label_model(retriever, manifest_path, epochs: int, seed: int, progress: bool):
    """Adebayo et al.'s data randomisation: the architecture trained on permuted labels."""
    from index.builder import case_table
    from retrieval.data.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    df = manifest.select(["train"])
    if df.empty:
        raise CasebaseError(f"{manifest_path}: no train cases for the data-randomisation test")
    table = case_table(manifest, df)
    classes = list(retriever.model.config.classes)
    xs, ys = [], []
    for _, row in table.iterrows():
        if row["label"] not in classes:
            continue
        try:
            xs.append(retriever.preprocessor.load(row["image"])[1])
        except CasebaseError:
            continue
        ys.append(classes.index(row["label"]))
    if len(xs) < 2:
        raise CasebaseError("fewer than 2 readable train cases for the data-randomisation test")
    device = next(retriever.model.parameters()).device
    return sanity.permuted_label_model(
        retriever.model,
        torch.stack(xs).to(device),
        torch.tensor(ys),
        epochs=epochs,
        seed=seed,
        progress=progress,
    )


COLUMNS = [
    ("pointing_game", "point", "{:.2f}"),
    ("pointing_game_strict", "strict", "{:.2f}"),
    ("mask_energy", "energy", "{:.2f}"),
    ("mask_area", "area", "{:.2f}"),
    ("deletion_auc", "del", "{:.3f}"),
    ("deletion_auc_random", "del rnd", "{:.3f}"),
    ("insertion_auc", "ins", "{:.3f}"),
    ("insertion_auc_random", "ins rnd", "{:.3f}"),
    ("randomization_spearman", "rand rho", "{:+.2f}"),
    ("randomization_ssim", "rand ssim", "{:.2f}"),
    ("sanity_check", "sanity", "{}"),
    ("deletion_gain", "del gain", "{:+.3f}"),
    ("faithfulness_correlation", "faith r", "{:+.2f}"),
    ("max_sensitivity", "max sens", "{:.2f}"),
    ("seconds_per_map", "s/map", "{:.2f}"),
]


def format_table(report: dict) -> str:
    """A human-readable table of the report (one row per method) plus each summary line."""
    head = f"{'method':<22}" + "".join(f"{label:>10}" for _, label, _ in COLUMNS)
    lines = [
        f"explanation trust on {report['n_cases']} {report['split']} cases with lesion masks",
        head,
        "-" * len(head),
    ]
    methods = report["methods"]
    order = [n for n in registry.METHODS if n in methods]
    order += [n for n in methods if n not in order]
    for name in order:
        m = methods[name]
        lines.append(
            f"{name:<22}" + "".join(f"{fmt.format(m[key]):>10}" for key, _, fmt in COLUMNS)
        )
    lines.append("")
    lines.append(
        "point: pointing game (tolerance half a feature-map cell); strict: no tolerance; energy: "
        "share of positive map mass on the lesion (area: chance level); del/ins: deletion / "
        "insertion AUC of the predicted-class probability (rnd: random pixel order; lower del and "
        f"higher ins are better); rand rho/ssim: trained vs re-initialised model maps (pass: "
        f"mean |rho| < {SANITY_THRESHOLD:g}); faith r: faithfulness correlation (higher is "
        "better); max sens: max-sensitivity to small input noise (lower is better)."
    )
    for name in order:
        lines.append(f"  {name}: {methods[name]['summary']}")
        by = methods[name].get("by_label") or {}
        if len(by) > 1:
            parts = ", ".join(
                f"{lab} {v['pointing_game']:.2f} (n={v['n']})" for lab, v in by.items()
            )
            lines.append(f"    pointing game by label: {parts}")
    lesion = report.get("similarity_lesion_share") or {}
    if lesion.get("n_pairs"):
        lines.append(
            f"  similarity in lesion x lesion cell pairs: median {lesion['median_share']:.0%} "
            f"(mean {lesion['mean_share']:.0%}; an even spread would give "
            f"{lesion['median_chance']:.0%}) over {lesion['n_pairs']} query-neighbour pairs"
        )
    for msg in report.get("skipped", []):
        lines.append(f"  skipped: {msg}")
    return "\n".join(lines)
