"""Sanity checks for saliency maps as in Adebayo et al. (NeurIPS 2018), and Hanawa et al.'s
(ICLR 2021) minimal tests for the neighbours as explanations.

Model-parameter randomisation. The model's parameterised blocks, from the top
(``logits``: the classifier and embedding heads) down to the first convolution
(:func:`blocks`), are re-initialised (each module's ``reset_parameters``, the
layer's own initialisation distribution; BatchNorm statistics reset), seeded:

* **cascading**: the top k blocks randomised, k = 1..L (the paper's Fig. 2);
* **independent**: block k alone randomised.

At every step each method's query map (same target class, same neighbour
images) is compared with the trained model's map at input resolution by the
paper's four similarities: Spearman rank correlation of the absolute values
(``spearman_abs``) and of the signed values (``spearman``), SSIM (scikit-image)
and the Pearson correlation of HOG features (scikit-image ``hog``), the last
two on the absolute maps scaled to [0, 1]. Each curve is the mean over cases
and over ``SEEDS`` (>= 3) re-initialisations; ``*_sd`` is the spread over seeds.

Verdict: a method **fails** when its trained maps are constant or empty on
half of the cases or more (a map that shows nothing cannot be checked and
cannot explain), or when its cascading ``spearman_abs`` curve, averaged over
the cascade's steps (``cascade_mean``, the area under the paper's Fig. 2
curve), is >= ``SANITY_THRESHOLD`` (0.5): the map then survives randomising
the weights that make the decision and changes only once the first
convolutions (the edge detectors) are replaced. Judging only the fully
randomised end point would pass such a method: on the photo phantom model
guided backprop keeps |ρ| 0.95 with the logits randomised and 0.74 with the
top four blocks, and only falls to 0.35 when the first convolution goes too
(Grad-CAM: -0.22 at the first step, mean 0.09). Adebayo et al. report the
same for guided backprop and guided Grad-CAM. A randomised map that is
constant counts as "no rank kept" (ρ = 0): the model's change did reach it.

Data randomisation (opt-in, costs a training run): the same architecture
trained from scratch for a few epochs on the split's training cases with the
labels permuted; its maps compared with the trained model's as above.

Hanawa et al.'s minimal tests for similarity-based explanations, on the
evaluated cases against the index (the neighbours a user sees):

* **model randomisation**: the Spearman correlation between the similarities a
  query has to a pool of cases under the trained and under a fully randomised
  model (low is good: the relevance depends on the model);
* **identical class**: the share of queries whose top neighbour has the query's
  predicted class (pass at >= 0.5; chance is the class share);
* **identical subclass**: the share whose top neighbour of the same class also
  shares a finer attribute (a manifest column, e.g. a lesion subtype), against
  the within-class base rate of that attribute.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

SEEDS = (0, 1, 2)
SANITY_THRESHOLD = 0.5
SANITY_CASES = 4
# Hanawa et al.'s identical-subclass test: top neighbour's subclass above chance at this level
SUBCLASS_ALPHA = 0.05
METRICS = ("spearman_abs", "spearman", "ssim", "hog")
DATA_RANDOMIZATION_EPOCHS = 5


# ---------------------------------------------------------------- randomisation
def blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The parameterised blocks from the top down: ``[(label, [module names])]``."""
    heads = ("classifier", "projection", "extent_head")  # the extent head: models with one
    out = [("logits", [n for n in heads if hasattr(model, n)])]
    feats = model.backbone.features
    for name, mod in reversed(list(feats.named_children())):
        if any(True for _ in mod.parameters()):
            out.append((f"block {name}", [f"backbone.features.{name}"]))
    return out


def randomized(model: nn.Module, names: Sequence[str], seed: int) -> nn.Module:
    """A copy of ``model`` with the named modules (and their children) re-initialised, seeded."""
    rnd = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            root = rnd.get_submodule(name)
            for mod in root.modules():
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
    return rnd.eval()


# ---------------------------------------------------------------- map similarity
def is_constant(a: np.ndarray) -> bool:
    a = np.nan_to_num(np.asarray(a, np.float64))
    return bool(a.std() < 1e-12 * max(1.0, float(np.abs(a).max())) or a.std() == 0)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if is_constant(a) or is_constant(b):
        return 0.0
    rho = float(spearmanr(a.ravel(), b.ravel()).statistic)
    return 0.0 if math.isnan(rho) else rho


def _unit(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(), a.max()
    return np.zeros_like(a) if hi - lo < 1e-12 else (a - lo) / (hi - lo)


def _hog(a: np.ndarray) -> np.ndarray:
    """HOG features of a 2-D map; of a volume's (D, H, W) map, those of its axial slices one
    after the other (HOG is 2-D: the volume's descriptor is the stack of its slices')."""
    from skimage.feature import hog

    if a.ndim == 3:
        return np.concatenate([_hog(sl) for sl in a])
    cell = max(2, min(a.shape) // 8)
    return hog(a, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))


def _ssim_window(shape: tuple[int, ...]) -> int:
    """scikit-image's default 7, or the largest odd size that fits the smallest side (a
    volume's depth can be below 7)."""
    w = min(7, *shape)
    return w if w % 2 else w - 1


def map_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The paper's four similarities between a trained (a) and a randomised (b) map.

    2-D maps, or a volume's 3-D maps: Spearman over every voxel, SSIM in 3-D (scikit-image's
    N-d SSIM, window :func:`_ssim_window`), HOG on the axial slices (:func:`_hog`)."""
    from skimage.metrics import structural_similarity

    a = np.nan_to_num(np.asarray(a, np.float64))
    b = np.nan_to_num(np.asarray(b, np.float64))
    ua, ub = _unit(np.abs(a)), _unit(np.abs(b))
    ha, hb = _hog(ua), _hog(ub)
    if ha.std() < 1e-12 or hb.std() < 1e-12:
        hog_r = 0.0
    else:
        hog_r = float(np.corrcoef(ha, hb)[0, 1])
    return {
        "spearman_abs": _spearman(np.abs(a), np.abs(b)),
        "spearman": _spearman(a, b),
        "ssim": float(
            structural_similarity(ua, ub, data_range=1.0, win_size=_ssim_window(ua.shape))
        ),
        "hog": 0.0 if math.isnan(hog_r) else hog_r,
    }


# ---------------------------------------------------------------- the check
@dataclass
class _Curves:
    """values[step][seed] -> list of per-case similarity dicts."""

    steps: list[str]
    values: dict = field(default_factory=dict)

    def add(self, step: int, seed: int, sim: dict) -> None:
        self.values.setdefault(step, {}).setdefault(seed, []).append(sim)

    def summary(self) -> dict:
        out: dict[str, list] = {}
        for metric in METRICS:
            means, sds = [], []
            for step in range(len(self.steps)):
                per_seed = [
                    float(np.mean([v[metric] for v in cases]))
                    for cases in self.values.get(step, {}).values()
                    if cases
                ]
                means.append(float(np.mean(per_seed)) if per_seed else float("nan"))
                sds.append(float(np.std(per_seed)) if per_seed else float("nan"))
            out[metric] = means
            out[f"{metric}_sd"] = sds
        return out


MapFn = Callable[[nn.Module, str, dict], np.ndarray]


def sanity_checks(
    model: nn.Module,
    cases: list[dict],
    names: Sequence[str],
    query_map: MapFn,
    seeds: Sequence[int] = SEEDS,
    progress: bool = True,
    data_randomized: nn.Module | None = None,
    threshold: float = SANITY_THRESHOLD,
) -> dict[str, dict]:
    """Cascading and independent randomisation curves and the verdict per method.

    ``query_map(model, name, case) -> (S, S)`` is the map a query shows for the
    case (the trained map when ``model`` is the trained model).
    """
    from tqdm.auto import tqdm

    blist = blocks(model)
    labels = [b[0] for b in blist]
    trained = {n: [query_map(model, n, c) for c in cases] for n in names}
    cascade = {n: _Curves(labels) for n in names}
    indep = {n: _Curves(labels) for n in names}
    jobs = [(seed, k) for seed in seeds for k in range(len(blist))]
    for seed, k in tqdm(jobs, desc="sanity", unit="model", disable=not progress):
        cum = [m for _, mods in blist[: k + 1] for m in mods]
        rnd_c = randomized(model, cum, seed)
        rnd_i = rnd_c if k == 0 else randomized(model, blist[k][1], seed)
        for n in names:
            for ci, case in enumerate(cases):
                cascade[n].add(k, seed, map_similarity(trained[n][ci], query_map(rnd_c, n, case)))
                sim_i = (
                    cascade[n].values[k][seed][-1]
                    if rnd_i is rnd_c
                    else map_similarity(trained[n][ci], query_map(rnd_i, n, case))
                )
                indep[n].add(k, seed, sim_i)
    out = {}
    for n in names:
        constant = sum(is_constant(m) for m in trained[n])
        c, i = cascade[n].summary(), indep[n].summary()
        mean = float(np.mean(c["spearman_abs"]))
        if constant * 2 >= len(cases):
            verdict, reason = "fail", f"constant or empty map on {constant} of {len(cases)} cases"
        elif not mean < threshold:
            verdict = "fail"
            reason = (
                f"the map keeps a mean |rank| correlation of {mean:.2f} >= {threshold:g} with "
                f"the trained map over the cascade ({c['spearman_abs'][0]:.2f} with the top "
                f"block randomised, {c['spearman_abs'][-1]:.2f} with all): it hardly depends "
                "on the weights that make the decision"
            )
        else:
            verdict = "pass"
            reason = (
                f"mean |rank| correlation over the cascade {mean:.2f} ({c['spearman_abs'][0]:.2f} "
                f"with the top block randomised, {c['spearman_abs'][-1]:.2f} with all)"
            )
        entry = {
            "blocks": labels,
            "seeds": list(seeds),
            "n_cases": len(cases),
            "cascading": c,
            "independent": i,
            "constant_maps": int(constant),
            "full_randomization": {m: c[m][-1] for m in METRICS},
            "cascade_mean": {m: float(np.mean(c[m])) for m in METRICS},
            "verdict": verdict,
            "reason": reason,
            "threshold_abs_spearman": threshold,
        }
        if data_randomized is not None:
            sims = [
                map_similarity(trained[n][ci], query_map(data_randomized, n, case))
                for ci, case in enumerate(cases)
            ]
            entry["data_randomization"] = {m: float(np.mean([s[m] for s in sims])) for m in METRICS}
        out[n] = entry
    return out


# ---------------------------------------------------------------- data randomisation
def permuted_label_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = DATA_RANDOMIZATION_EPOCHS,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """The same architecture trained from scratch on permuted labels (cross-entropy, Adam).

    ``images``: (N, C, S, S) normalised training inputs; returns the model and its
    training accuracy on the permuted labels (how far it memorised them)."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from retrieval.model.network import CaseNet

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CaseNet(model.config).to(images.device)
    perm = labels[torch.randperm(len(labels), generator=g)].to(images.device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    steps = max(1, math.ceil(len(images) / batch_size))
    for _ in tqdm(range(epochs), desc="permuted-label training", disable=not progress):
        order = torch.randperm(len(images), generator=g)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            loss = F.cross_entropy(net(images[idx]), perm[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float(
            torch.cat([net(images[i : i + 64]).argmax(1) for i in range(0, len(images), 64)])
            .eq(perm)
            .float()
            .mean()
        )
    return net, {"epochs": epochs, "train_accuracy_on_permuted_labels": acc, "n": len(images)}


# ---------------------------------------------------------------- Hanawa et al.
def neighbour_tests(
    embed_trained: Callable[[torch.Tensor], torch.Tensor],
    embed_random: Callable[[torch.Tensor], torch.Tensor],
    queries: torch.Tensor,
    pool: torch.Tensor,
    query_labels: Sequence[str],
    pool_labels: Sequence[str],
    predicted: Sequence[str],
    query_sub: Sequence[str] | None = None,
    pool_sub: Sequence[str] | None = None,
    same: np.ndarray | None = None,
) -> dict:
    """Hanawa et al.'s three minimal tests on embeddings of ``queries`` against ``pool``.

    ``same``: (Q, P) bool, pairs to exclude (the query itself, the same patient)."""
    from scipy.stats import spearmanr

    with torch.no_grad():
        eq, ep = embed_trained(queries), embed_trained(pool)
        rq, rp = embed_random(queries), embed_random(pool)
    s_t = (eq @ ep.T).cpu().numpy().astype(np.float64)
    s_r = (rq @ rp.T).cpu().numpy().astype(np.float64)
    if same is not None:
        s_t = np.where(same, -np.inf, s_t)
    rhos = []
    for i in range(len(s_t)):
        ok = np.isfinite(s_t[i])
        if ok.sum() > 2 and s_r[i][ok].std() > 0:
            rhos.append(float(spearmanr(s_t[i][ok], s_r[i][ok]).statistic))
    top = s_t.argmax(1)
    pool_labels = np.asarray(pool_labels)
    hit = pool_labels[top] == np.asarray(predicted)
    classes, counts = np.unique(pool_labels, return_counts=True)
    share = dict(zip(classes.tolist(), (counts / counts.sum()).tolist(), strict=True))
    chance = float(np.mean([share.get(p, 0.0) for p in predicted]))
    out = {
        "n_queries": len(s_t),
        "pool_size": int(pool.shape[0]),
        "model_randomization": {
            "spearman": float(np.mean(rhos)) if rhos else float("nan"),
            "verdict": "pass" if rhos and np.mean(rhos) < SANITY_THRESHOLD else "fail",
        },
        "identical_class": {
            "rate": float(hit.mean()),
            "chance": chance,
            "verdict": "pass" if hit.mean() >= 0.5 else "fail",
        },
    }
    if query_sub is not None and pool_sub is not None:
        pool_sub = np.asarray(pool_sub)
        qs, ql = np.asarray(query_sub), np.asarray(query_labels)
        rates, base = [], []
        for i in range(len(s_t)):
            cand = np.isfinite(s_t[i]) & (pool_labels == ql[i])
            if not cand.any():
                continue
            j = np.flatnonzero(cand)[np.argmax(s_t[i][cand])]
            rates.append(pool_sub[j] == qs[i])
            base.append(float(np.mean(pool_sub[cand] == qs[i])))
        if rates:
            from scipy.stats import binomtest

            rate, chance_sub = float(np.mean(rates)), float(np.mean(base))
            # above chance with a one-sided binomial test, so a handful of queries
            # that happen to agree is not a pass
            p = binomtest(
                int(np.sum(rates)),
                len(rates),
                min(max(chance_sub, 1e-9), 1.0),
                alternative="greater",
            ).pvalue
            out["identical_subclass"] = {
                "rate": rate,
                "chance": chance_sub,
                "n": len(rates),
                "p_value": float(p),
                "verdict": "pass" if p < SUBCLASS_ALPHA else "fail",
            }
    return out


# ---------------------------------------------------------------- the figure
def has_curves(entry: dict | None) -> bool:
    """Whether an explain-eval method entry carries per-block sanity curves to draw."""
    s = (entry or {}).get("sanity") or {}
    return bool(s.get("blocks")) and all(k in s for k in ("cascading", "independent"))


def curves_figure(
    methods: dict, title: str = "", suptitle: bool = True, panel: tuple[float, float] = (3.6, 3.0)
):
    """Adebayo et al.'s Fig. 2 per method, as a matplotlib Figure (the explain-eval PNG and
    the app's per-map panel draw the same picture): similarity to the trained map as the
    blocks are randomised from the top (cascading, solid) and one at a time (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in methods.items() if has_curves(m)]
    if not names:
        raise ValueError("no method carries sanity curves")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False)
    colours = dict(zip(METRICS, ("C0", "C1", "C2", "C3"), strict=True))
    for ax, name in zip(axes.ravel(), names, strict=False):
        s = methods[name]["sanity"]
        xs = ["original", *s["blocks"]]
        for metric in METRICS:
            ax.plot(
                xs, [1.0, *s["cascading"][metric]], "-o", ms=3, color=colours[metric], label=metric
            )
            ax.plot(xs, [1.0, *s["independent"][metric]], "--", color=colours[metric], alpha=0.5)
        ax.axhline(s["threshold_abs_spearman"], color="grey", lw=0.6, ls=":")
        ax.set_ylim(-0.5, 1.05)
        ax.set_title(
            f"{name}: {s['verdict']}", fontsize=9, color="C3" if s["verdict"] == "fail" else "black"
        )
        ax.tick_params(axis="x", labelrotation=60, labelsize=6)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6, loc="lower left")
    if suptitle:
        fig.suptitle(
            (title + "\n" if title else "")
            + "similarity to the trained model's map; solid: cascading randomisation from the "
            "top, dashed: one block at a time",
            fontsize=8,
        )
    fig.tight_layout()
    return fig


def plot_curves(methods: dict, path, title: str = "") -> None:
    """:func:`curves_figure` written atomically as PNG."""
    import io

    import matplotlib.pyplot as plt

    from retrieval import atomic

    fig = curves_figure(methods, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
