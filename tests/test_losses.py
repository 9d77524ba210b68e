import math

import pytest
import torch
import torch.nn.functional as F

from segtrain.losses import (LOSS_NAMES, LOSS_WEIGHTS, LOSSES, CombinedLoss, DiceLoss, FocalLoss,
                             LovaszSoftmaxLoss, OhemCrossEntropyLoss, build_loss, class_weights, loss_spec,
                             parse_loss_spec, weigh_terms)
from segtrain.metrics import confusion_matrix, segmentation_metrics

C = 4
COUNTS = [500, 120, 300, 80]
SPECS = ["ce", "weighted_ce", "focal", "dice", "lovasz", "ohem", "ce+0.5*dice", "weighted_ce+lovasz"]


def make_batch(seed=0, n=2, h=6, w=7, ignore_frac=0.25):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, h, w, generator=gen) * 2
    target = torch.randint(0, C, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < ignore_frac] = 255
    return logits, target


def loss_for(spec):
    # min_kept small so OHEM actually drops pixels on these tiny batches; alpha per class to exercise it.
    if spec == "focal":
        return FocalLoss(C, alpha=[0.5, 1.0, 1.5, 2.0])
    return build_loss(spec, num_classes=C, class_pixel_counts=COUNTS, options={"ohem_min_kept": 5})


def value_and_grad(loss_fn, logits, target):
    logits = logits.clone().requires_grad_(True)
    value = loss_fn(logits, target)
    value.backward()
    return value.detach(), logits.grad


# ---------------------------------------------------------------- equivalences with cross-entropy

def test_focal_with_gamma_0_is_cross_entropy():
    logits, target = make_batch()
    focal_value, focal_grad = value_and_grad(FocalLoss(C, gamma=0.0), logits, target)
    ce_value, ce_grad = value_and_grad(lambda x, t: F.cross_entropy(x, t, ignore_index=255), logits, target)
    torch.testing.assert_close(focal_value, ce_value, rtol=1e-6, atol=0)
    torch.testing.assert_close(focal_grad, ce_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(build_loss("ce", C)(logits, target), focal_value, rtol=1e-6, atol=0)


def test_focal_by_hand():
    # One labelled pixel with p(true) = 0.8, one ignored. gamma=2, alpha of class 1 = 0.25.
    logits = torch.log(torch.tensor([0.2, 0.8])).view(1, 2, 1, 1).repeat(1, 1, 1, 2)
    target = torch.tensor([[[1, 255]]])
    loss = FocalLoss(2, gamma=2.0, alpha=[1.0, 0.25])(logits, target)
    assert loss.item() == pytest.approx(0.25 * 0.2 ** 2 * -math.log(0.8), rel=1e-5)
    assert FocalLoss(2, gamma=2.0, alpha=3.0)(logits, target).item() == pytest.approx(3 * 0.04 * -math.log(0.8), rel=1e-5)


def test_weighted_ce_with_unit_weights_is_ce_and_matches_torch_weighting():
    logits, target = make_batch(1)
    ones = build_loss("weighted_ce", C, class_pixel_counts=[10] * C, options={"class_weighting": "inverse"})  # all weights 1
    torch.testing.assert_close(ones(logits, target), F.cross_entropy(logits, target, ignore_index=255))
    w = class_weights(COUNTS, "enet")  # the default weighting
    weighted = build_loss("weighted_ce", C, class_pixel_counts=COUNTS)
    torch.testing.assert_close(weighted(logits, target), F.cross_entropy(logits, target, weight=w, ignore_index=255))


# ---------------------------------------------------------------- class weights by hand

def test_class_weights_by_hand():
    # freq = [0.1, 0.3, 0, 0.6]; class 2 has no pixels -> weight 0 for every method.
    counts = [100, 300, 0, 600]
    # inverse: 1/freq = [10, 10/3, -, 5/3], mean 5 -> [2, 2/3, 0, 1/3]
    assert class_weights(counts, "inverse").tolist() == pytest.approx([2, 2 / 3, 0, 1 / 3])
    # median_frequency: median(0.1, 0.3, 0.6) = 0.3 -> [3, 1, 0, 0.5]
    assert class_weights(counts, "median_frequency").tolist() == pytest.approx([3, 1, 0, 0.5])
    # enet: 1 / ln(1.02 + p)
    assert class_weights(counts, "enet").tolist() == pytest.approx(
        [1 / math.log(1.12), 1 / math.log(1.32), 0, 1 / math.log(1.62)])
    # even number of classes: median of [0.1, 0.2, 0.3, 0.4] is 0.25
    assert class_weights([1, 2, 3, 4], "median_frequency").tolist() == pytest.approx([2.5, 1.25, 0.25 / 0.3, 0.625])


def test_class_weights_and_build_loss_errors():
    with pytest.raises(ValueError, match="unknown class weighting"):
        class_weights(COUNTS, "log")
    with pytest.raises(ValueError, match="non-negative"):
        class_weights([0, 0, 0], "inverse")
    with pytest.raises(ValueError, match="class pixel counts"):
        build_loss("weighted_ce", C)
    with pytest.raises(ValueError, match="valid names: ce, weighted_ce, focal, dice, lovasz, ohem"):
        build_loss("ce+tversky", C)
    with pytest.raises(ValueError, match="bad loss term"):
        build_loss("ce+x*dice", C)
    with pytest.raises(ValueError, match="bad loss term"):
        build_loss("ce+", C)
    with pytest.raises(ValueError, match="positive"):
        build_loss("0*ce", C)
    with pytest.raises(ValueError, match="unknown loss option.*focal_gama"):
        build_loss("focal", C, options={"focal_gama": 1.0})
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        build_loss("ce", C)(torch.zeros(1, C, 8, 8), torch.zeros(1, 4, 4, dtype=torch.long))


# ---------------------------------------------------------------- properties every loss must have

@pytest.mark.parametrize("spec", SPECS)
def test_ignore_pixels_never_contribute(spec):
    loss_fn = loss_for(spec)
    logits, target = make_batch(2)
    ignore = target == 255
    assert ignore.any() and (~ignore).any()
    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[ignore] = torch.randn(int(ignore.sum()), C) * 50
    value, grad = value_and_grad(loss_fn, logits, target)
    value2, grad2 = value_and_grad(loss_fn, changed, target)
    assert torch.equal(value, value2)
    assert torch.equal(grad, grad2)
    assert (grad.permute(0, 2, 3, 1)[ignore] == 0).all()
    assert grad.permute(0, 2, 3, 1)[~ignore].abs().sum() > 0


@pytest.mark.parametrize("spec", SPECS)
def test_all_ignore_batch_gives_zero_and_finite_grads(spec):
    logits, _ = make_batch(3)
    target = torch.full(logits.shape[:1] + logits.shape[2:], 255)
    value, grad = value_and_grad(loss_for(spec), logits, target)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("spec", SPECS)
def test_bf16_autocast_on_cpu_gives_finite_float32_loss_and_grads(spec):
    _, target = make_batch(4)
    features = torch.randn(2, 3, 6, 7)
    conv = torch.nn.Conv2d(3, C, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(features)
        assert logits.dtype == torch.bfloat16
        value = loss_for(spec)(logits, target)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_combined_spec_equals_weighted_sum():
    logits, target = make_batch(5)
    combined = build_loss("ce+0.5*dice", C)
    assert isinstance(combined, CombinedLoss) and combined.coefs == [1.0, 0.5]
    expected = build_loss("ce", C)(logits, target) + 0.5 * build_loss("dice", C)(logits, target)
    torch.testing.assert_close(combined(logits, target), expected)
    combined = build_loss(" weighted_ce + 2e-1 * lovasz ", C, class_pixel_counts=COUNTS, options={"class_weighting": "enet"})
    expected = (build_loss("weighted_ce", C, class_pixel_counts=COUNTS, options={"class_weighting": "enet"})(logits, target)
                + 0.2 * build_loss("lovasz", C)(logits, target))
    torch.testing.assert_close(combined(logits, target), expected)


def test_weights_set_replace_add_and_remove_terms():
    assert set(LOSS_WEIGHTS.values()) == set(LOSSES)  # one weight per loss, whatever LOSSES holds
    assert weigh_terms("ce+0.5*dice", {}) == [(1.0, "ce"), (0.5, "dice")]
    assert weigh_terms("ce+0.5*dice", {"dice_weight": 0.25, "ce_weight": None}) == [(1.0, "ce"), (0.25, "dice")]
    assert weigh_terms("ce", {"lovasz_weight": 2.0}) == [(1.0, "ce"), (2.0, "lovasz")]  # added at the end
    assert weigh_terms("ce+dice", {"ce_weight": 0.0}) == [(1.0, "dice")]  # 0 removes it
    assert weigh_terms("ce+ce+0.5*dice", {}) == [(2.0, "ce"), (0.5, "dice")]  # one term per loss
    with pytest.raises(ValueError, match=r"^no term left: ce_weight=0 remove\(s\) every term of 'ce'"):
        weigh_terms("ce", {"ce_weight": 0.0})
    with pytest.raises(ValueError, match="dice_weight must be a finite number >= 0, got nan"):
        weigh_terms("ce", {"dice_weight": math.nan})
    with pytest.raises(ValueError, match="dice_weight must be a finite number >= 0, got -1"):
        weigh_terms("ce", {"dice_weight": -1})
    with pytest.raises(ValueError, match="unknown loss weight 'tversky_weight'"):
        weigh_terms("ce", {"tversky_weight": 1.0})
    assert loss_spec([(1.0, "ce"), (0.5, "dice"), (2.0, "lovasz")]) == "ce+0.5*dice+2*lovasz"
    assert loss_spec([(1.0, "ce"), (0.7342109823, "dice")], digits=3) == "ce+0.734*dice"  # run names


@pytest.mark.parametrize("terms", [[(1.0, "ce")], [(1.0, "ce"), (0.5, "dice")], [(0.1 + 0.2, "lovasz")],
                                   [(2.0, "focal"), (1e-05, "ohem")], [(0.7342109823, "dice")]])
def test_loss_spec_reads_back_to_the_same_floats(terms):
    assert parse_loss_spec(loss_spec(terms)) == terms


def test_every_name_builds_alone():
    for name in LOSS_NAMES:
        assert not isinstance(loss_for(name), CombinedLoss)


# ---------------------------------------------------------------- Dice and Lovász

@pytest.mark.parametrize("loss_cls", [DiceLoss, LovaszSoftmaxLoss])
def test_region_losses_near_zero_when_perfect_and_large_when_wrong(loss_cls):
    _, target = make_batch(6)
    safe = target.masked_fill(target == 255, 0)
    perfect = 20.0 * F.one_hot(safe, C).permute(0, 3, 1, 2).float()
    wrong = 20.0 * F.one_hot((safe + 1) % C, C).permute(0, 3, 1, 2).float()
    loss_fn = loss_cls(C)
    assert loss_fn(perfect, target).item() < 1e-4
    assert loss_fn(wrong, target).item() > 0.9


def hard_logits(pred):
    return 100.0 * F.one_hot(pred, C).permute(0, 3, 1, 2).float()


def test_lovasz_on_hard_predictions_is_one_minus_iou_of_present_classes():
    # At 0/1 probabilities the Lovász extension equals the Jaccard loss it extends.
    logits, target = make_batch(7, h=9, w=9)
    target[target == 3] = 255  # class 3 absent from the target: left out of the mean
    pred = logits.argmax(1)
    iou = segmentation_metrics(confusion_matrix(pred, target, C))["iou"]
    expected = sum(1 - iou[c] for c in range(3)) / 3
    assert LovaszSoftmaxLoss(C)(hard_logits(pred), target).item() == pytest.approx(expected, abs=1e-6)


def reference_lovasz_softmax(probs, labels):
    """Berman et al.'s per-class loop (lovasz_softmax_flat, classes='present') on flat (P, C) probabilities."""
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        gt_sorted = fg[perm]
        gts = gt_sorted.sum()
        jaccard = 1.0 - (gts - gt_sorted.cumsum(0)) / (gts + (1 - gt_sorted).cumsum(0))
        jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
        losses.append(torch.dot(errors_sorted, jaccard))
    return torch.stack(losses).mean()


def test_lovasz_matches_reference_loop_on_soft_probabilities():
    logits, target = make_batch(8)
    valid = target != 255
    flat_probs = logits.softmax(1).permute(0, 2, 3, 1)[valid]
    expected = reference_lovasz_softmax(flat_probs, target[valid])
    torch.testing.assert_close(LovaszSoftmaxLoss(C)(logits, target), expected)


def test_dice_on_hard_predictions_by_formula():
    logits, target = make_batch(9, h=9, w=9)
    target[target == 2] = 255
    pred = logits.argmax(1)
    cm = confusion_matrix(pred, target, C).double()
    present = [c for c in range(C) if cm[c].sum() > 0]
    dice = [(2 * cm[c, c] + 1) / (cm[c].sum() + cm[:, c].sum() + 1) for c in present]
    expected = 1 - sum(dice) / len(dice)
    assert DiceLoss(C, smooth=1.0)(hard_logits(pred), target).item() == pytest.approx(expected.item(), abs=1e-6)


# ---------------------------------------------------------------- OHEM

def test_ohem_keeps_only_hard_pixels_by_hand():
    # 5 pixels, 2 classes, true class 0 everywhere; p(true) = 0.9, 0.6, 0.3, 0.95 and an
    # ignored pixel with p = 0.01 (the hardest, but it must never be kept).
    p = torch.tensor([0.9, 0.6, 0.3, 0.95, 0.01])
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    ce = -p.log()

    def ohem(min_kept):
        return OhemCrossEntropyLoss(2, thresh=0.7, min_kept=min_kept)(logits, target).item()

    assert ohem(0) == pytest.approx((ce[1] + ce[2]).item() / 2, rel=1e-5)   # below 0.7: 0.6, 0.3
    assert ohem(1) == pytest.approx((ce[1] + ce[2]).item() / 2, rel=1e-5)   # min_kept already met
    assert ohem(3) == pytest.approx((ce[0] + ce[1] + ce[2]).item() / 3, rel=1e-5)  # 3 hardest
    assert ohem(100) == pytest.approx(ce[:4].mean().item(), rel=1e-5)       # fewer labelled than min_kept

    grad = value_and_grad(OhemCrossEntropyLoss(2, thresh=0.7, min_kept=0), logits, target)[1]
    assert (grad[..., [0, 3, 4]] == 0).all() and (grad[..., [1, 2]] != 0).all()


def test_options_reach_the_loss_that_declares_them_and_default_to_its_signature():
    from segtrain.losses import LOSS_OPTIONS, LOSSES
    built = build_loss("focal+ohem", C, options={"focal_gamma": 0.5, "ohem_thresh": 0.3, "ohem_min_kept": 7})
    focal, ohem = built.losses
    assert (focal.gamma, ohem.thresh, ohem.min_kept) == (0.5, 0.3, 7)
    assert build_loss("focal", C).gamma == LOSS_OPTIONS["focal_gamma"].default == 2.0
    assert LOSS_OPTIONS["ohem_min_kept"].default == OhemCrossEntropyLoss(C).min_kept
    owners = {name: cls for cls in LOSSES.values() for name in cls.options}
    assert set(owners) == set(LOSS_OPTIONS) == {"class_weighting", "focal_gamma", "ohem_thresh", "ohem_min_kept"}


# ---------------------------------------------------------------- the sync-free formulation

def _old_valid_pixels(logits, target):
    valid = target != 255
    return logits.permute(0, 2, 3, 1)[valid], target[valid]


def old_focal(logits, target, gamma, alpha):
    # The boolean-mask formulation the masked one replaced (segtrain before issue 17).
    valid = target != 255
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[valid]
    loss = (-torch.expm1(-ce)).clamp_min(torch.finfo(ce.dtype).eps) ** gamma * ce
    loss = alpha[target[valid]] * loss
    return loss.sum() / valid.sum().clamp_min(1)


def old_dice(logits, target, smooth=1.0):
    logits, target = _old_valid_pixels(logits, target)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, C).to(probs.dtype)
    dice = (2 * (probs * onehot).sum(0) + smooth) / (probs.sum(0) + onehot.sum(0) + smooth)
    present = (onehot.sum(0) > 0).to(dice.dtype)
    return ((1 - dice) * present).sum() / present.sum().clamp_min(1)


def old_lovasz(logits, target):
    from segtrain.losses import lovasz_grad
    logits, target = _old_valid_pixels(logits, target)
    probs = logits.softmax(dim=1)
    fg = F.one_hot(target, C).to(probs.dtype)
    errors_sorted, perm = (fg - probs).abs().sort(dim=0, descending=True)
    per_class = (errors_sorted * lovasz_grad(fg.gather(0, perm))).sum(0)
    present = (fg.sum(0) > 0).to(per_class.dtype)
    return (per_class * present).sum() / present.sum().clamp_min(1)


def old_ohem(logits, target, thresh, min_kept):
    valid = target != 255
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[valid]
    prob = torch.exp(-ce.detach())
    kept = prob < thresh
    k = min(min_kept, prob.numel())
    if k > 0:
        kept |= prob <= prob.kthvalue(k).values
    return (ce * kept).sum() / kept.sum().clamp_min(1)


ALPHA = torch.tensor([0.5, 1.0, 1.5, 2.0])
OLD_AND_NEW = {
    "focal": (lambda lg, t: old_focal(lg, t, 2.0, ALPHA), FocalLoss(C, alpha=ALPHA.tolist())),
    "dice": (old_dice, DiceLoss(C)),
    "lovasz": (old_lovasz, LovaszSoftmaxLoss(C)),
    "ohem few kept": (lambda lg, t: old_ohem(lg, t, 0.7, 5), OhemCrossEntropyLoss(C, thresh=0.7, min_kept=5)),
    "ohem min_kept > labelled": (lambda lg, t: old_ohem(lg, t, 0.3, 1000), OhemCrossEntropyLoss(C, thresh=0.3, min_kept=1000)),
}


@pytest.mark.parametrize("name", list(OLD_AND_NEW))
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
def test_masked_losses_equal_the_boolean_mask_formulation(name, ignore_frac):
    old, new = OLD_AND_NEW[name]
    for seed in range(3):
        logits, target = make_batch(seed, n=2, h=9, w=11, ignore_frac=ignore_frac)
        value, grad = value_and_grad(new, logits, target)
        old_value, old_grad = value_and_grad(old, logits, target)
        torch.testing.assert_close(value, old_value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, old_grad, rtol=1e-5, atol=1e-6)
        assert (grad.permute(0, 2, 3, 1)[target == 255] == 0).all()  # ignore pixels: exactly 0
