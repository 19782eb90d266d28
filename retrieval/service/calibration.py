"""Temperature scaling and the expected calibration error (Guo et al. 2017).

A softmax is usually over-confident; one temperature T, fitted on held-out
cases by minimising the negative log-likelihood, divides the logits so that
"0.8" means right about 80 % of the time, without changing any argmax. The
classifier's probabilities are all the bundle keeps, so the logits are
log-probabilities (the same up to a per-case constant, which softmax ignores).

ECE: top-1 confidence in 15 equal-width bins, the bin-size-weighted mean
|accuracy − confidence|. The reliability diagram is that table drawn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

N_BINS = 15
T_BOUNDS = (0.05, 20.0)


def as_logits(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, np.float64), 1e-12, None))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    lp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-lp[np.arange(len(lp)), np.asarray(labels, np.int64)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T > 0 minimising the NLL of softmax(logits / T) (1.0 when there is nothing to fit)."""
    logits = np.asarray(logits, np.float64)
    if len(logits) < 2:
        return 1.0
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize_scalar(
        lambda lt: nll(logits, labels, float(np.exp(lt))), bounds=(lo, hi), method="bounded"
    )
    t = float(np.exp(res.x))
    return t if nll(logits, labels, t) <= nll(logits, labels, 1.0) else 1.0


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(as_logits(probs) / float(temperature), axis=-1)


@dataclass
class Reliability:
    """Per-bin table of a reliability diagram (empty bins have count 0)."""

    edges: list[float]
    confidence: list[float]  # mean top-1 confidence in the bin
    accuracy: list[float]  # share correct in the bin
    count: list[int]
    ece: float

    def to_json(self) -> dict:
        return asdict(self)


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> Reliability:
    probs = np.atleast_2d(np.asarray(probs, np.float64))
    labels = np.asarray(labels, np.int64)
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bins (lo, hi]; the first also takes 0
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    sum_conf = np.bincount(b, conf, minlength=n_bins)
    sum_acc = np.bincount(b, correct, minlength=n_bins)
    safe = np.maximum(count, 1)
    mean_conf, mean_acc = sum_conf / safe, sum_acc / safe
    n = max(len(conf), 1)
    ece = float((count / n * np.abs(mean_acc - mean_conf)).sum())
    return Reliability(
        edges.tolist(), mean_conf.tolist(), mean_acc.tolist(), count.astype(int).tolist(), ece
    )


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    return reliability(probs, labels, n_bins).ece


def reliability_png(curves: dict[str, Reliability], title: str = "") -> bytes:
    """PNG bytes of the reliability diagram of each named curve (e.g. before / after)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=110)
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="perfect")
    for name, rel in curves.items():
        m = np.asarray(rel.count) > 0
        ax.plot(
            np.asarray(rel.confidence)[m],
            np.asarray(rel.accuracy)[m],
            marker="o",
            ms=3,
            label=f"{name} (ECE {rel.ece:.3f})",
        )
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "reliability diagram", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
