"""Temperature scaling and the expected calibration error (Guo et al. 2017).

A softmax is usually over-confident; one temperature T, fitted on held-out
cases by minimising the negative log-likelihood, divides the logits so that
"0.8" means right about 80 % of the time, without changing any argmax. The
classifier's probabilities are all the bundle keeps, so the logits are
log-probabilities (the same up to a per-case constant, which softmax ignores).

ECE: top-1 confidence in 15 equal-width bins, the bin-size-weighted mean
|accuracy − confidence|. The reliability diagram is that table drawn.

When the held-out cases are perfectly separated (each one's true class on top,
common on a small, easy val split), the NLL keeps falling as T → 0: its
"minimum" is the search bound (T = 0.05 turned 0.39 into 1.00 on an
out-of-distribution image), not an estimate. Such cases say the model is at
least as sure as it is, never how much surer, so T = 1 is kept and
:func:`temperature_note` says why. No fixed floor (e.g. T ≥ 0.5) instead: a
genuinely under-confident model needs T < 0.5 (0.4 is recovered on synthetic
data), and any floor would be as arbitrary as the bound it replaces.
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


def separable(logits: np.ndarray, labels: np.ndarray) -> bool:
    """Every case's true class strictly on top: then NLL(T) → 0 as T → 0 (no minimum)."""
    logits = np.atleast_2d(np.asarray(logits, np.float64))
    labels = np.asarray(labels, np.int64)
    if not len(logits) or logits.shape[1] < 2:
        return False
    idx = np.arange(len(logits))
    true = logits[idx, labels]
    others = logits.copy()
    others[idx, labels] = -np.inf
    return bool((true > others.max(1)).all())


def _raw_fit(logits: np.ndarray, labels: np.ndarray) -> float:
    """log T of the NLL minimum within T_BOUNDS (may sit on a bound)."""
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize_scalar(
        lambda lt: nll(logits, labels, float(np.exp(lt))), bounds=(lo, hi), method="bounded"
    )
    return float(res.x)


def temperature_note(logits: np.ndarray, labels: np.ndarray) -> str | None:
    """Why no temperature is fitted on these cases and T = 1 is kept (None: T is fitted)."""
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if n < 2:
        return f"{n} calibration case(s): nothing to fit a temperature on; T = 1 kept"
    if separable(logits, labels):
        return (
            f"the {n} calibration cases are perfectly separated (each one's true class has "
            "the highest probability): the NLL falls towards 0 as T -> 0, so a fitted T would "
            "be the search bound, not an estimate, and would push every probability to 0 or 1; "
            "T = 1 kept (the softmax as it is)"
        )
    if _raw_fit(logits, labels) <= np.log(T_BOUNDS[0]) + 1e-3:
        return (
            f"the NLL of the {n} calibration cases is lowest at the search bound "
            f"T = {T_BOUNDS[0]:g} (nearly separated cases): not an estimate; T = 1 kept"
        )
    return None


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T > 0 minimising the NLL of softmax(logits / T); 1.0 when the cases cannot pin T down
    (too few, or separated so that the NLL has no minimum: temperature_note says which)."""
    logits = np.asarray(logits, np.float64)
    if temperature_note(logits, labels) is not None:
        return 1.0
    t = float(np.exp(_raw_fit(logits, labels)))
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


def ece_note(
    ece_before: float | None,
    ece_after: float | None,
    temperature: float | None,
    n_test: int | None = None,
    calibrated_on: str | None = None,
) -> str | None:
    """Why a test ECE may rise after temperature scaling (None when it does not).

    T is fitted on the calibration cases (the NLL optimum there), never on the split eval
    scores; on a small test split, or for a model whose softmax is already about calibrated,
    the test ECE can come out higher after T: that is sampling noise and the fit's limits,
    not a bug in the scaling."""
    if ece_before is None or ece_after is None or not ece_after > ece_before + 1e-12:
        return None
    t = "" if temperature is None else f"T = {temperature:.2f} "
    where = calibrated_on or "the calibration split"
    n = "" if n_test is None else f" ({n_test} cases)"
    return (
        f"temperature scaling raised the test ECE ({ece_before:.3f} -> {ece_after:.3f}): {t}was "
        f"fitted on {where}, not on this test split{n}, and does not improve ECE here (a small "
        "test split makes ECE noisy; an already-calibrated softmax has little to gain). Not a "
        "bug: the calibrated probabilities and prediction sets still use that T."
    )
