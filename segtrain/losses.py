"""Segmentation losses, chosen by a string spec such as ``"ce+0.5*dice"`` (the ``--loss`` flag).

Every loss maps logits (N, C, H, W) and a target (N, H, W) of class indices to
a scalar, and shares three guarantees (see ``SegmentationLoss``):

* pixels labelled ``ignore_index`` (255: ``datasets.IGNORE_INDEX``, what every dataset's void
  pixels are mapped to, e.g. VOC's object boundaries) contribute
  neither to the value nor to the gradient;
* the loss is computed in float32 with autocast off, so bf16/fp16 logits from
  a mixed-precision forward pass do not lose the small probabilities that the
  logs and sorts below depend on;
* a batch with no labelled pixel gives 0 (still attached to the graph, so
  ``backward`` works), never NaN: averages divide by a count that is replaced
  by 1 when it is 0 (the sum is 0 then too), with no data-dependent branch.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segtrain.datasets import IGNORE_INDEX

WEIGHTINGS = {  # --class-weighting (see class_weights)
    "inverse": "1/freq, scaled to mean 1",
    "median_frequency": "median(freq)/freq (Eigen & Fergus)",
    "enet": "1/ln(1.02 + freq) (ENet; bounded by ~50)",
}


@dataclass(frozen=True)
class LossOption:
    """A loss parameter that the config exposes as a field (``focal_gamma`` -> ``--focal-gamma``).

    ``arg`` is the constructor argument it sets; its default is that argument's default
    (filled in by ``LOSS_OPTIONS``), so the value has one owner: the loss's signature.
    """

    arg: str
    help: str
    choices: Optional[Mapping[str, str]] = None
    minimum: Optional[float] = None
    default: Any = None


def class_weights(pixel_counts: Sequence[int], method: str = "enet") -> Tensor:
    """Per-class CE weights (float32, shape (C,)) from training-set pixel counts per class.

    With freq_c = pixels of c / labelled pixels (ignore excluded):
      inverse           1 / freq_c, scaled so the weights average 1 over classes with pixels
      median_frequency  median(freq) / freq_c (Eigen & Fergus 2015), median over classes
                        with pixels, averaging the two middle values when their count is even
      enet              1 / ln(1.02 + freq_c) (Paszke et al. 2016, ENet), bounded by ~50.5

    Eigen & Fergus divide each class's pixels by the pixels of the images that
    contain it; the manifest stores only global counts, so freq_c here is the
    global frequency, the usual simplification.

    A class with no pixels gets weight 0 under every method: it cannot occur in
    targets drawn from the same data, and 1/0 would put inf into the loss.
    """
    if method not in WEIGHTINGS:
        raise ValueError(f"unknown class weighting {method!r}; choose one of {', '.join(WEIGHTINGS)}")
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    if counts.dim() != 1 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"class pixel counts must be a list of non-negative numbers with a positive sum, got {list(pixel_counts)}")
    present = counts > 0
    freq = counts / counts.sum()
    weights = torch.zeros_like(freq)
    if method == "inverse":
        inv = 1.0 / freq[present]
        weights[present] = inv / inv.mean()
    elif method == "median_frequency":
        weights[present] = freq[present].quantile(0.5) / freq[present]
    else:  # enet
        weights[present] = 1.0 / torch.log(1.02 + freq[present])
    return weights.float()


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, with 0 wherever den == 0 (there num is 0 too): no NaN in value or gradient."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _one_hot(target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(P,) class indices -> (P, C) 0/1 of ``dtype``. Not ``F.one_hot``: it checks the classes'
    range with ``.item()`` (min and max) on CPU tensors, where tests/test_syncs.py counts syncs;
    a comparison reads nothing back on any device."""
    return (target[:, None] == torch.arange(num_classes, device=target.device)).to(dtype)


def _flat_pixels(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(P, C) logits, (P,) targets with ignore pixels set to class 0, and the (P,) float mask of
    labelled pixels, over all P = N*H*W pixels.

    Multiplying by the mask (rather than cutting the ignore pixels out with ``x[valid]``)
    keeps every shape independent of the data: boolean-mask indexing makes a CUDA device
    wait for the host to learn the count of labelled pixels. The gradient of an ignore
    pixel is still exactly 0: its terms are multiplied by 0.
    """
    valid = target != ignore_index
    flat = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    return flat, target.masked_fill(~valid, 0).reshape(-1), valid.reshape(-1).to(logits.dtype)


class SegmentationLoss(nn.Module):
    """Base class: checks shapes, turns autocast off, casts logits to float32, then ``compute``.

    A subclass declares the parameters the config may set in ``options`` (config field ->
    ``LossOption``); ``from_options`` builds it from those values.
    """

    options: ClassVar[dict[str, LossOption]] = {}

    @classmethod
    def option_kwargs(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments that ``options`` (config field -> value) sets for this loss."""
        return {o.arg: options[name] for name, o in cls.options.items() if name in options}

    @classmethod
    def from_options(cls, num_classes: int, ignore_index: int, options: Mapping[str, Any],
                     class_pixel_counts: Optional[Sequence[int]] = None) -> SegmentationLoss:
        return cls(num_classes, ignore_index, **cls.option_kwargs(options))

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"{type(self).__name__}: expected logits (N, C, H, W) and target (N, H, W) of the same "
                             f"N, H, W, got {tuple(logits.shape)} and {tuple(target.shape)} (upsample logits to the label size)")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"{type(self).__name__}: logits have {logits.shape[1]} channels, expected {self.num_classes} classes")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.compute(logits.float(), target.long())

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


class CrossEntropyLoss(SegmentationLoss):
    """Pixel-wise (optionally class-weighted) cross-entropy, ``nn.CrossEntropyLoss``'s "mean".

    With weights the mean is sum_i w_{y_i} CE_i / sum_i w_{y_i}, as in torch,
    so scaling all weights changes nothing and all-ones weights equal plain CE.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 weight: Optional[Tensor] = None) -> None:
        super().__init__(num_classes, ignore_index)
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"class weights must have shape ({num_classes},), got {tuple(weight.shape)}")
        # Non-persistent: derived from the config, not state worth checkpointing.
        self.register_buffer("weight", None if weight is None else weight.float(), persistent=False)

    def extra_repr(self) -> str:
        return f"weighted={self.weight is not None}"

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        # The training loop moves the loss to the device once; .to() is a no-op then and only
        # copies (one host-to-device transfer per call) for callers that leave it on the CPU.
        weight = None if self.weight is None else self.weight.to(logits.device)
        # 'sum' / our own denominator instead of 'mean': torch's mean is NaN when every pixel is ignored.
        total = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index, reduction="sum")
        valid = target != self.ignore_index
        den = valid.sum() if weight is None else (weight[target.masked_fill(~valid, 0)] * valid).sum()
        return _safe_div(total, den.to(total.dtype))


class WeightedCrossEntropyLoss(CrossEntropyLoss):
    """Cross-entropy with per-class weights from the training set's pixel counts (the train manifest's)."""

    options = {"class_weighting": LossOption("weighting", "how weighted_ce turns class pixel counts into weights",
                                             choices=WEIGHTINGS)}

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 class_pixel_counts: Optional[Sequence[int]] = None, weighting: str = "enet") -> None:
        if class_pixel_counts is None:
            raise ValueError("weighted_ce needs class pixel counts (the train manifest's class_pixel_counts)")
        if len(class_pixel_counts) != num_classes:
            raise ValueError(f"weighted_ce: {len(class_pixel_counts)} class pixel counts for {num_classes} classes")
        super().__init__(num_classes, ignore_index, weight=class_weights(class_pixel_counts, weighting))

    @classmethod
    def from_options(cls, num_classes: int, ignore_index: int, options: Mapping[str, Any],
                     class_pixel_counts: Optional[Sequence[int]] = None) -> SegmentationLoss:
        return cls(num_classes, ignore_index, class_pixel_counts, **cls.option_kwargs(options))


class FocalLoss(SegmentationLoss):
    """Softmax focal loss (Lin et al. 2017): mean over labelled pixels of alpha_y (1 - p_y)^gamma CE.

    ``alpha`` is None (1), a scalar that scales every pixel, or one weight per
    class; RetinaNet's alpha/(1 - alpha) split is a binary (sigmoid) notion with
    no softmax counterpart. gamma=0 with alpha=None is cross-entropy (same
    terms, same mean; equal up to float summation order).
    VainF's DeepLabV3Plus-Pytorch ``FocalLoss`` defaults to alpha=1, gamma=0,
    i.e. plain CE, but averages over all pixels including ignored ones; here
    the mean is over labelled pixels only, like ``nn.CrossEntropyLoss``.
    """

    options = {"focal_gamma": LossOption("gamma", "focal loss exponent; 0 = cross-entropy", minimum=0)}

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 gamma: float = 2.0, alpha: Optional[float | Sequence[float]] = None) -> None:
        super().__init__(num_classes, ignore_index)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        if alpha is not None:
            alpha = torch.as_tensor(alpha, dtype=torch.float32)
            if alpha.dim() > 1 or (alpha.dim() == 1 and len(alpha) != num_classes):
                raise ValueError(f"focal alpha must be a scalar or {num_classes} per-class values, got shape {tuple(alpha.shape)}")
        self.register_buffer("alpha", alpha, persistent=False)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={None if self.alpha is None else self.alpha.tolist()}"

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        valid = target != self.ignore_index
        # CE is 0 (with 0 gradient) at ignore pixels; no x[valid]: that would sync a CUDA device.
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        loss = ce
        if self.gamma > 0:
            # 1 - p_y = 1 - exp(-CE), via expm1 for precision near p_y = 1. The clamp keeps the
            # gradient of x^gamma finite at x = 0 when gamma < 1 (p_y rounds to exactly 1).
            one_minus_p = (-torch.expm1(-ce)).clamp_min(torch.finfo(ce.dtype).eps)
            loss = one_minus_p ** self.gamma * loss
        if self.alpha is not None:
            alpha = self.alpha.to(logits.device)  # a no-op once the loss is on the device
            loss = (alpha[target.masked_fill(~valid, 0)] if alpha.dim() == 1 else alpha) * loss
        return _safe_div((loss * valid).sum(), valid.sum().to(loss.dtype))


class DiceLoss(SegmentationLoss):
    """Multi-class soft Dice loss on softmax probabilities: 1 - mean_c Dice_c.

    Dice_c = (2 sum p_c g_c + smooth) / (sum p_c + sum g_c + smooth), the sums
    running over every labelled pixel of the batch (batch Dice, steadier than
    per image); g is the one-hot target. The mean is over classes present in
    the batch's target, as in Lovász-softmax's classes='present': a VOC batch
    holds a few of the 21 classes, and an absent class's Dice would measure only
    its stray probability mass, which the present classes' terms already
    penalise (softmax mass on a wrong class is missing from the right one).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 smooth: float = 1.0) -> None:
        super().__init__(num_classes, ignore_index)
        if smooth <= 0:
            raise ValueError(f"dice smooth must be > 0, got {smooth}")
        self.smooth = smooth

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}"

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target, valid = _flat_pixels(logits, target, self.ignore_index)
        probs = logits.softmax(dim=1) * valid[:, None]
        onehot = _one_hot(target, self.num_classes, probs.dtype) * valid[:, None]
        intersection = (probs * onehot).sum(0)
        cardinality = probs.sum(0) + onehot.sum(0)
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth)
        present = (onehot.sum(0) > 0).to(dice.dtype)
        return _safe_div(((1 - dice) * present).sum(), present.sum())


def lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted in decreasing order.

    ``gt_sorted`` (P, K): 0/1 foreground indicators of K independent problems
    (one column per class), each sorted by that class's decreasing error.
    Berman et al. 2018, Alg. 1: g_i = J(i) - J(i-1), J(i) the Jaccard loss when
    the i largest errors are predicted wrong.
    """
    gts = gt_sorted.sum(0)
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)  # >= 1 from the first row on, never 0
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)


class LovaszSoftmaxLoss(SegmentationLoss):
    """Lovász-softmax (Berman, Rannen Triki & Blaschko, CVPR 2018), classes='present', per_image=False.

    A convex surrogate of 1 - IoU per class: errors |g_c - p_c| over all labelled
    pixels of the batch, sorted in decreasing order, dotted with ``lovasz_grad``,
    averaged over classes present in the target. All classes are handled in one
    sort along the pixel axis instead of a Python loop, and ignore pixels are sorted to
    the end (key -1) instead of being cut out, so every shape is fixed by the input's and
    nothing waits for the host (no ``.item()``, ``nonzero`` or boolean-mask indexing).
    At the end they add nothing: their error and foreground are 0, and the terms of the
    labelled pixels before them depend only on the rows above.
    """

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target, valid = _flat_pixels(logits, target, self.ignore_index)
        probs = logits.softmax(dim=1)
        fg = _one_hot(target, self.num_classes, probs.dtype) * valid[:, None]
        errors = (fg - probs).abs() * valid[:, None]
        perm = torch.where(valid[:, None] > 0, errors.detach(), -1.0).sort(dim=0, descending=True).indices
        errors_sorted, fg_sorted = errors.gather(0, perm), fg.gather(0, perm)
        per_class = (errors_sorted * lovasz_grad(fg_sorted)).sum(0)
        present = (fg.sum(0) > 0).to(per_class.dtype)
        return _safe_div((per_class * present).sum(), present.sum())


class OhemCrossEntropyLoss(SegmentationLoss):
    """Online hard example mining CE: the mean CE over the hard labelled pixels only.

    A pixel is hard when its probability of the true class is below ``thresh``;
    if fewer than ``min_kept`` pixels are hard, the ``min_kept`` lowest-probability
    pixels are kept instead (all of them when there are fewer labelled pixels;
    ties at the cut are kept too). Ignore pixels are never kept. The cut is the k-th
    smallest probability with k fixed by the input's shape and ignore pixels ranked last,
    so no count of labelled pixels has to reach the host.
    """

    options = {"ohem_thresh": LossOption("thresh", "ohem: pixels whose true-class probability is below this are hard"),
               "ohem_min_kept": LossOption("min_kept", "ohem: keep at least this many hardest pixels per batch",
                                           minimum=0)}

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 thresh: float = 0.7, min_kept: int = 100_000) -> None:
        super().__init__(num_classes, ignore_index)
        if not 0 < thresh <= 1 or min_kept < 0:
            raise ValueError(f"ohem needs 0 < thresh <= 1 and min_kept >= 0, got thresh={thresh}, min_kept={min_kept}")
        self.thresh = thresh
        self.min_kept = min_kept

    def extra_repr(self) -> str:
        return f"thresh={self.thresh}, min_kept={self.min_kept}"

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        valid = target != self.ignore_index
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none").flatten()
        valid = valid.flatten()
        # Probability of the true class (selection is not differentiated); 2 ranks ignore pixels last.
        prob = torch.where(valid, torch.exp(-ce.detach()), 2.0)
        kept = prob < self.thresh
        k = min(self.min_kept, prob.numel())
        if k > 0:  # with fewer than k labelled pixels the cut is 2: all of them are kept
            kept |= prob <= prob.kthvalue(k).values
        kept &= valid
        return _safe_div((ce * kept).sum(), kept.sum().to(ce.dtype))


class CombinedLoss(nn.Module):
    """sum_i coef_i * loss_i(logits, target), built from a spec such as ``"ce+0.5*dice"``."""

    def __init__(self, terms: Sequence[tuple[float, str, nn.Module]]) -> None:
        super().__init__()
        self.coefs = [coef for coef, _, _ in terms]
        self.names = [name for _, name, _ in terms]
        self.losses = nn.ModuleList(loss for _, _, loss in terms)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return sum(coef * loss(logits, target) for coef, loss in zip(self.coefs, self.losses))

    def extra_repr(self) -> str:
        return "+".join(f"{coef:g}*{name}" for coef, name in zip(self.coefs, self.names))


# --loss: one entry per loss. A loss with a parameter declares it in its ``options``
# (and the config gets one field for it: see LOSS_OPTIONS).
LOSSES: dict[str, type[SegmentationLoss]] = {
    "ce": CrossEntropyLoss, "weighted_ce": WeightedCrossEntropyLoss, "focal": FocalLoss,
    "dice": DiceLoss, "lovasz": LovaszSoftmaxLoss, "ohem": OhemCrossEntropyLoss,
}
LOSS_NAMES = tuple(LOSSES)


def _declared_options() -> dict[str, LossOption]:
    options = {}
    for cls in LOSSES.values():
        for name, option in cls.options.items():
            default = inspect.signature(cls).parameters[option.arg].default
            options[name] = dataclasses.replace(option, default=default)
    return options


LOSS_OPTIONS: dict[str, LossOption] = _declared_options()  # config field -> option, default included
_TERM = re.compile(r"^(?:(?P<coef>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[a-z_]+)$")


def parse_loss_spec(spec: str) -> list[tuple[float, str]]:
    """``"ce+0.5*dice"`` -> ``[(1.0, "ce"), (0.5, "dice")]``; ValueError naming what is wrong."""
    terms = []
    for term in spec.replace(" ", "").split("+"):
        match = _TERM.match(term)
        if match is None:
            raise ValueError(f"bad loss term {term!r} in {spec!r}; expected 'name' or 'coef*name' joined by '+', "
                             f"names: {', '.join(LOSS_NAMES)}")
        if match["name"] not in LOSSES:
            raise ValueError(f"unknown loss {match['name']!r} in {spec!r}; valid names: {', '.join(LOSS_NAMES)}, "
                             f"combined as e.g. 'ce+0.5*dice'")
        coef = float(match["coef"]) if match["coef"] else 1.0
        if not (math.isfinite(coef) and coef > 0):
            raise ValueError(f"loss coefficient must be positive, got {match['coef']} in {spec!r}")
        terms.append((coef, match["name"]))
    return terms


# --ce-weight, --dice-weight, ...: one config field per loss, that term's coefficient as a number (a
# sweep varies it, a parallel-coordinates panel plots it); see weigh_terms.
LOSS_WEIGHTS: dict[str, str] = {f"{name}_weight": name for name in LOSSES}  # config field -> loss name
WEIGHT_HELP = ("coefficient of the {name} loss: replaces its coefficient in --loss, or adds the term; "
               "0 removes it; none: as --loss says (the saved config holds every loss's, 0 when absent)")


def weigh_terms(spec: str, weights: Mapping[str, Optional[float]]) -> list[tuple[float, str]]:
    """The terms of ``spec`` with ``weights`` (LOSS_WEIGHTS field -> coefficient, None: as ``spec``
    says) applied, one term per loss (``ce+ce`` is ``2*ce``).

    A weight wins over the coefficient in ``spec``: it replaces it (a sweep varies one term of the mix
    a config file names), adds the term at the end when ``spec`` lacks it, and 0 removes the term.
    ValueError, naming the field, for a weight that is negative or not finite, or no term left.
    """
    merged: dict[str, float] = {}
    for coef, name in parse_loss_spec(spec):
        merged[name] = merged.get(name, 0.0) + coef
    for field, weight in weights.items():
        if field not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss weight {field!r}; known: {', '.join(LOSS_WEIGHTS)}")
        if weight is None:
            continue
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{field} must be a finite number >= 0, got {weight}")
        merged[LOSS_WEIGHTS[field]] = float(weight)
    if not any(merged.values()):
        zeroed = ", ".join(f"{field}=0" for field, weight in weights.items() if weight == 0)
        raise ValueError(f"no term left: {zeroed} remove(s) every term of {spec!r}; give a loss a weight > 0")
    return [(coef, name) for name, coef in merged.items() if coef > 0]


def loss_spec(terms: Sequence[tuple[float, str]], digits: Optional[int] = None) -> str:
    """``[(1.0, "ce"), (0.5, "dice")]`` -> ``"ce+0.5*dice"``: a coefficient of 1 left out, the others
    in the shortest text that reads back as the same float (or ``digits`` significant digits: names)."""
    def text(coef: float) -> str:
        return (repr(float(coef)) if digits is None else f"{coef:.{digits}g}").removesuffix(".0")
    return "+".join(name if coef == 1 else f"{text(coef)}*{name}" for coef, name in terms)


def build_loss(spec: str, num_classes: int, ignore_index: int = IGNORE_INDEX,
               class_pixel_counts: Optional[Sequence[int]] = None,
               options: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The loss named by ``spec``: one of LOSS_NAMES, or ``[coef*]name`` terms joined by '+'.

    Examples: ``"ce"``, ``"focal"``, ``"ce+dice"``, ``"weighted_ce+lovasz"``,
    ``"ce+0.5*dice"``. ``options`` sets the losses' declared options by name
    (``{"focal_gamma": 1.0}``, see LOSS_OPTIONS); the others keep their defaults.
    ``weighted_ce`` weighs classes by ``class_pixel_counts`` (from the train manifest).
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown loss option(s) {', '.join(unknown)}; known: {', '.join(LOSS_OPTIONS)}")
    terms = [(coef, name, LOSSES[name].from_options(num_classes, ignore_index, options, class_pixel_counts))
             for coef, name in parse_loss_spec(spec)]
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][2]
    return CombinedLoss(terms)
