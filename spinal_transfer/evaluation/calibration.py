"""Calibrated probabilities: temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

Fine-tuned networks are over-confident: among predictions made with probability 0.95, fewer than 95% are right.
Temperature scaling divides every logit by one scalar T > 0 fitted on held-out data (the val split) to minimise
its negative log-likelihood; T > 1 softens over-confident probabilities. The argmax, and so every accuracy
metric, is unchanged. After it, a probability p means: among images predicted with about p, about a fraction
p is right (on data like the val split).

`calibrated_softmax` is the one probability function: `evaluate`, `predict`, `Predictor`, the ONNX/int8
runners (and anything serving a model) compute softmax(logits / T) through it, with T from the checkpoint
or bundle (`temperature_of`; 1 for one that has none). The expected calibration error (ECE) uses 15 equal-width
confidence bins, as Guo et al.; the bins themselves (`reliability`) draw the reliability diagram.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

NUM_BINS = 15
T_BOUNDS = (0.05, 20.0)     # beyond these the val split is degenerate (e.g. all correct: T -> 0), not informative


def temperature_of(meta: Optional[Mapping]) -> float:
    """The temperature a checkpoint or bundle config carries; 1 (no change) for one made before calibration, or
    for a run without a val split."""
    t = (meta or {}).get("temperature")
    return float(t) if t else 1.0


def bound_of(temperature: float) -> Optional[float]:
    """The end of T_BOUNDS `temperature` sits on (the best T may lie beyond it), or None."""
    return next((b for b in T_BOUNDS if abs(math.log(temperature / b)) < 0.01), None)


def probabilities_note(meta: Optional[Mapping], calibrated: bool = True) -> str:
    """How a model's probabilities are made, in one line: predict, export and serve say it, so a plain softmax
    (from last.pt, a run still training, or a bundle exported from one) is never taken for a calibrated one. A
    finished run that fitted no temperature recorded why (`calibration_note`: a val split all right, none right, or
    none at all): that reason is said, not guesses that do not apply to it."""
    if not calibrated:
        return "probabilities: the plain softmax (calibration turned off)"
    t, why = (meta or {}).get("temperature"), (meta or {}).get("calibration_note")
    if t:
        edge = bound_of(float(t)) is not None      # the search stopped at an end of its range
        return (f"probabilities: softmax(logits / T), T = {float(t):.3f}, calibrated on the run's val split"
                + (f"; T is at the end of the range searched ({T_BOUNDS[0]:g}-{T_BOUNDS[1]:g}): the val split did "
                   f"not pin it down, so read the probabilities as rough" if edge else ""))
    if why:
        return f"probabilities: {why}"
    return ("probabilities: the plain softmax (not calibrated): this model carries no temperature. A run fits one "
            "on its val split when it finishes and keeps it in checkpoints/best.pt; last.pt, a run still training "
            "or without val, and a bundle exported from one of those have none")


def calibrated_softmax(logits: torch.Tensor, temperature: float = 1.0,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """softmax(logits / T) along dim 1, in `dtype`: the probabilities every consumer of a model reports."""
    return torch.softmax(logits.to(dtype) / temperature, dim=1)


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the targets under softmax(logits / T)."""
    return float(F.cross_entropy(logits.double() / temperature, targets.long()))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T in T_BOUNDS that minimises the NLL of `targets` under softmax(logits / T): scipy's bounded Brent
    search over log T (float64). The NLL is convex in 1/T, so one bounded 1-D search finds the optimum; a
    gradient method on a clamped log T stopped wherever a step first crossed a bound (the clamp's gradient is
    zero there), and returned the bound for an optimum inside it."""
    from scipy.optimize import minimize_scalar  # lazy: scipy's import is slow and only a finished run needs it

    z, y = logits.detach().double().cpu(), targets.detach().long().cpu()

    def loss(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    res = minimize_scalar(loss, bounds=tuple(math.log(b) for b in T_BOUNDS), method="bounded",
                          options={"xatol": 1e-10})
    return float(min(max(math.exp(res.x), T_BOUNDS[0]), T_BOUNDS[1]))


BOOTSTRAP = 200            # resamples of val behind the temperature's interval
INTERVAL = (2.5, 97.5)     # its percentiles: a 95% interval


def temperature_interval(logits: torch.Tensor, targets: torch.Tensor, resamples: int = BOOTSTRAP,
                         seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the fitted T: T refitted on `resamples` resamples of the split (with
    replacement), on a grid of 200 log-spaced T in T_BOUNDS (3% apart). Why: a T fitted on a small val split is
    one number whatever its uncertainty, and on 50-100 images it can be off by a factor of two; the interval says
    how far to trust the calibrated probabilities. A resample without a wrong (or right) image fits T at a bound,
    which widens the interval to it: the split cannot pin T down. Seeded, so a run reports the same interval."""
    z, y = logits.detach().double().cpu(), targets.detach().long().cpu()
    grid = torch.logspace(math.log10(T_BOUNDS[0]), math.log10(T_BOUNDS[1]), 200, dtype=torch.float64)
    per_image = torch.stack([F.cross_entropy(z / t, y, reduction="none") for t in grid], dim=1)      # (N, grid)
    n = len(y)
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts = torch.from_numpy(np.stack([np.bincount(row, minlength=n) for row in picks])).double()
    fitted = grid[(counts @ per_image).argmin(dim=1)].numpy()
    lo, hi = np.percentile(fitted, INTERVAL)
    return float(lo), float(hi)


@dataclass
class Reliability:
    """Per equal-width confidence bin (lo, hi]: images, their accuracy and their mean confidence (top
    probability); empty bins hold 0."""

    edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of (share of images) x |accuracy - confidence|."""
        n = self.counts.sum()
        return float((self.counts / max(n, 1) * np.abs(self.accuracy - self.confidence)).sum())


def reliability(probs: torch.Tensor, targets: torch.Tensor, bins: int = NUM_BINS) -> Reliability:
    """The reliability bins of predicted probabilities `probs` (N, C) against `targets` (N,)."""
    p = probs.detach().double().cpu().numpy()
    y = targets.detach().cpu().numpy()
    conf, correct = p.max(1), (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)      # bin i holds (e_i, e_i+1]
    counts = np.bincount(which, minlength=bins).astype(np.float64)
    safe = np.maximum(counts, 1)
    return Reliability(edges, counts, np.bincount(which, correct, bins) / safe, np.bincount(which, conf, bins) / safe)


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = NUM_BINS) -> float:
    return reliability(probs, targets, bins).ece


@dataclass
class SplitCalibration:
    """One split's logits and targets, before and after temperature T."""

    logits: torch.Tensor
    targets: torch.Tensor
    temperature: float

    def bins(self, after: bool) -> Reliability:
        return reliability(calibrated_softmax(self.logits, self.temperature if after else 1.0), self.targets)

    def to_dict(self) -> dict:
        return {"ece_before": self.bins(False).ece, "ece_after": self.bins(True).ece,
                "nll_before": nll(self.logits, self.targets), "nll_after": nll(self.logits, self.targets,
                                                                              self.temperature),
                "num_samples": len(self.targets)}


@dataclass
class Calibration:
    """A fitted temperature and the splits it is measured on (val: where it was fitted; test: held out)."""

    temperature: float
    splits: dict[str, SplitCalibration]
    interval: tuple[float, float]          # temperature_interval on val

    def to_dict(self) -> dict:
        """What report.json records under "calibration"."""
        warning = self.bound_note()
        return {"temperature": self.temperature, "temperature_interval": list(self.interval),
                "temperature_interval_method": f"95% percentile bootstrap, {BOOTSTRAP} resamples of val",
                "fitted_on": "val", "num_bins": NUM_BINS, **{name: s.to_dict() for name, s in self.splits.items()},
                **({"warning": warning} if warning else {})}

    def describe(self) -> str:
        parts = [f"{name} ECE {d['ece_before']:.4f} -> {d['ece_after']:.4f}, NLL {d['nll_before']:.4f} -> "
                 f"{d['nll_after']:.4f}" for name, d in ((n, s.to_dict()) for n, s in self.splits.items())]
        lo, hi, warning = *self.interval, self.bound_note()
        return (f"temperature {self.temperature:.3f} (fitted on {len(self.splits['val'].targets)} val images; 95% "
                f"bootstrap interval {lo:.2f}-{hi:.2f}"
                + ("; the val split is too small to pin it down: more val images (--val-fraction) narrow it"
                   if hi > 2 * lo else "") + (f"; {warning}" if warning else "") + "): " + "; ".join(parts))

    def bound_note(self) -> Optional[str]:
        """Said when T ended on a bound of T_BOUNDS: the best T may lie beyond it, and the probabilities are as
        sharp (T = 0.05: a few val images all but one right ask for certainty) or as flat as the bound allows."""
        at = bound_of(self.temperature)
        if at is None:
            return None
        low = at == T_BOUNDS[0]
        return (f"T is at the {'lower' if low else 'upper'} bound of its search ({at:g}): the "
                f"{len(self.splits['val'].targets)} val images ask for {'sharper' if low else 'flatter'} "
                f"probabilities than any T allowed, so the probabilities are "
                f"{'near 0 or 1' if low else 'near uniform'}; a bigger val split (--val-fraction) gives a T to trust "
                f"(predict and evaluate give the plain softmax with --no-calibration)")


NO_VAL_NOTE = ("not calibrated: the run has no val split, and fitting the temperature on test would make test "
               "no longer held out; probabilities are the plain softmax (T = 1)")


def unfittable(logits: torch.Tensor, targets: torch.Tensor) -> Optional[str]:
    """Why a temperature cannot be fitted on this split (a note for report.json and the log), or None. With no
    misclassified image, every smaller T lowers the NLL: the fit only runs down to its bound and would make
    every probability about 1 (a 14-image val split all right gave T = 0.12 and p = 1 - 1e-12); with no image
    right, the same towards the uniform. Neither says how sure the model should be, so T stays 1."""
    if not len(targets):
        return NO_VAL_NOTE
    right = int((logits.argmax(1).cpu() == targets.cpu()).sum())
    if 0 < right < len(targets):
        return None
    which = "every one" if right else "none"
    return (f"not calibrated: {which} of the {len(targets)} val images is classified correctly, so the "
            f"temperature has no finite best value (the fit would only reach its bound); probabilities are the "
            f"plain softmax (T = 1); the fit needs a val split with images both right and wrong: a bigger one "
            f"(--val-fraction, or more images in val/)")


def calibrate(val: tuple[torch.Tensor, torch.Tensor],
              others: Optional[Mapping[str, tuple]] = None) -> tuple[Optional[Calibration], Optional[str]]:
    """Fit T on val's (logits, targets) and measure it there and on each of `others` ({name: (logits,
    targets)}, e.g. test; empty splits are left out): (calibration, None), or (None, why) where val has no
    finite best T (`unfittable`). A fit that ends on a bound of T_BOUNDS is kept: a model far less sure of
    itself than it should be (a frozen random backbone's small logits) is still better calibrated there."""
    why = unfittable(*val)
    if why:
        return None, why
    t = fit_temperature(*val)
    splits = {"val": SplitCalibration(*val, t)}
    splits.update({name: SplitCalibration(z, y, t) for name, (z, y) in (others or {}).items() if len(y)})
    return Calibration(t, splits, temperature_interval(*val)), None

