"""Segmentation losses as pure, jit-able `jax.numpy` functions.

Every loss says whether it takes logits or probabilities, and every loss takes an optional
`valid` pixel mask `[B, H, W]` (bool or float; 1 = a real pixel, 0 = padding): pixels with
`valid == 0` contribute nothing, and means are taken over valid pixels only. When no pixel is
valid the loss is 0 (never NaN).

Softmax head (logits `[B, H, W, C]`, integer labels `[B, H, W]` in `0..C-1`):
- `weighted_softmax_cross_entropy`: per pixel `w[y] * -log softmax(x)[y]`, as PyTorch's
  `F.cross_entropy(weight=w, reduction='none')`.
- `thesis_focal_loss`: the thesis' loss, `mean((1 - exp(-wce)) ** gamma * wce)` over pixels,
  where `wce` is the weighted cross entropy above (the focal term uses the *weighted* loss, so
  it modulates by `p_t ** w[y]`, not `p_t`: SEED_SPEC defect 5, kept because it is the thesis).
- `focal_loss`: the standard focal loss `-alpha[y] * (1 - p_t) ** gamma * log p_t`.

Sigmoid head (logits `[B, H, W, K]`, targets in {0, 1} `[B, H, W, K]`):
- `sigmoid_binary_cross_entropy`: as PyTorch's `BCEWithLogitsLoss(pos_weight=...)`.

Both heads: `soft_dice_loss` and `soft_jaccard_loss` (1 - soft Dice / soft IoU per class, pooled
over the batch and its pixels, smoothed, averaged over classes).

Metric-aware (sigmoid head): `bce_log_jaccard_loss`, BCE - log(soft Jaccard) with ONE soft
Jaccard pooled over the batch, its pixels and the five structures: the loss of the best single
model of ISIC 2018 Task 2 (0.433 official), whose score also pools every image and structure
(micro), so a batch without some structure still gives that structure's false positives a cost.

`compute_loss(loss_cfg, logits, batch, class_weights)` picks one by `loss_cfg.name`. The loss
config (`config.loss`) fields:
- `name`: one of `LOSS_NAMES`:
  - 'thesis_focal' (softmax): `thesis_focal_loss` with `class_weights` and `gamma` (the thesis).
  - 'weighted_ce' (softmax): `weighted_softmax_cross_entropy`, plain mean over valid pixels.
  - 'focal' (softmax): `focal_loss` with alpha = `class_weights` (None: no weighting), `gamma`.
  - 'weighted_ce_dice' (softmax): 'weighted_ce' + `dice_weight` * soft Dice loss of the softmax
    probabilities over the five structure channels (1..5; "others" is left out because it is
    mostly background and would dominate the mean).
  - 'bce' (sigmoid): `sigmoid_binary_cross_entropy` against `batch['structures']`, with
    `class_weights` (shape [K], or None) as `pos_weight`.
  - 'bce_dice' (sigmoid): 'bce' + `dice_weight` * soft Dice loss of the sigmoid probabilities.
  - 'bce_log_jaccard' (sigmoid): 'bce' - `jaccard_weight` * log(soft Jaccard pooled over the
    batch, pixels and structures), `bce_log_jaccard_loss`.
- `gamma` (float, default 2.0): focusing exponent of the focal losses.
- `dice_weight` (float, default 1.0): weight of the Dice term in the '*_dice' losses.
- `jaccard_weight` (float, default 1.0): weight of the -log(Jaccard) term of 'bce_log_jaccard'.

Positive weights of the sigmoid losses come from the caller (`class_weights`): the trainer
derives them from the training split's pixel counts with `loss.weights_from_data`.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

# The thesis' class weights for [others, cysts, neg. net, pig. net, streaks, globules]
# ("inverse number of samples, normalised"), SEED_SPEC "Loss".
THESIS_CLASS_WEIGHTS = (0.0047, 0.225, 0.264, 0.02, 0.348, 0.136)

SOFTMAX_LOSSES = ("thesis_focal", "weighted_ce", "focal", "weighted_ce_dice")
SIGMOID_LOSSES = ("bce", "bce_dice", "bce_log_jaccard")
LOSS_NAMES = SOFTMAX_LOSSES + SIGMOID_LOSSES
_REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_pixel: jax.Array, valid: jax.Array | None, reduction: str) -> jax.Array:
    """Reduces a [B, H, W] loss over valid pixels with a safe denominator."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if valid is None:
        valid = jnp.ones(per_pixel.shape, per_pixel.dtype)
    valid = jnp.broadcast_to(jnp.asarray(valid, per_pixel.dtype), per_pixel.shape)
    # `where`, not a product: a non-finite value at a padded pixel must not leak into the loss.
    masked = jnp.where(valid > 0, per_pixel * valid, 0.0)
    if reduction == "none":
        return masked
    total = jnp.sum(masked)
    if reduction == "sum":
        return total
    count = jnp.sum(valid)
    # Double `where` keeps the gradient finite when no pixel is valid.
    safe_count = jnp.where(count > 0, count, 1.0)
    return jnp.where(count > 0, total / safe_count, 0.0)


def _at_least_f32(x: jax.Array) -> jax.Array:
    """float32 (bfloat16 logits are upcast), or float64 where the input already is."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_softmax_inputs(logits: jax.Array, labels: jax.Array) -> None:
    if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits [..., C] and labels [...] shapes disagree: {logits.shape} vs {labels.shape}"
        )


def _per_pixel_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] per pixel; out-of-range labels give 0 (one-hot all zero)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=log_probs.dtype)
    return -jnp.sum(one_hot * log_probs, axis=-1)


def _gather_weights(class_weights: jax.Array | None, labels: jax.Array, num_classes: int):
    if class_weights is None:
        return jnp.ones(labels.shape, jnp.float32)
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights must have shape ({num_classes},), got {class_weights.shape}"
        )
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return jnp.sum(one_hot * class_weights, axis=-1)


def weighted_softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array | None = None,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Class-weighted softmax cross entropy from logits.

    Per pixel this is PyTorch's `F.cross_entropy(logits, labels, weight=w, reduction='none')`:
    `w[y] * -log softmax(logits)[y]`. The 'mean' reduction is a plain mean over valid pixels
    (as `.mean()` of the unreduced PyTorch loss), not PyTorch's `reduction='mean'`, which
    divides by the sum of the weights.

    Args:
        logits: float [B, H, W, C] logits.
        labels: int [B, H, W] class indices in 0..C-1.
        class_weights: float [C] per-class weights, or None for 1.
        valid: [B, H, W] pixel mask (bool or float), or None for all pixels.
        reduction: 'mean' (over valid pixels), 'sum', or 'none' ([B, H, W], 0 where invalid).

    Returns:
        A scalar, or [B, H, W] for reduction 'none'.
    """
    _check_softmax_inputs(logits, labels)
    nll = _per_pixel_nll(logits, labels)
    weights = _gather_weights(class_weights, labels, logits.shape[-1])
    return _reduce(weights * nll, valid, reduction)


def thesis_focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array | None = None,
    valid: jax.Array | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> jax.Array:
    """The thesis' focal loss: `mean((1 - exp(-wce)) ** gamma * wce)` from logits.

    `wce` is the per-pixel weighted cross entropy (`weighted_softmax_cross_entropy`,
    reduction 'none'); the mean is a plain mean over valid pixels, as the thesis' `.mean()`.

    Args:
        logits: float [B, H, W, C] logits.
        labels: int [B, H, W] class indices in 0..C-1.
        class_weights: float [C] per-class weights (thesis: `THESIS_CLASS_WEIGHTS`), or None.
        valid: [B, H, W] pixel mask, or None for all pixels.
        gamma: focusing exponent (thesis: 2).
        reduction: 'mean', 'sum' or 'none' ([B, H, W]).

    Returns:
        A scalar, or [B, H, W] for reduction 'none'.
    """
    wce = weighted_softmax_cross_entropy(logits, labels, class_weights, reduction="none")
    # -expm1(-x) is 1 - exp(-x) without cancellation for small losses.
    modulation = jnp.power(-jnp.expm1(-wce), gamma)
    return _reduce(modulation * wce, valid, reduction)


def focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    alpha: jax.Array | None = None,
    valid: jax.Array | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> jax.Array:
    """The standard softmax focal loss `-alpha[y] * (1 - p_t) ** gamma * log p_t` from logits.

    Args:
        logits: float [B, H, W, C] logits.
        labels: int [B, H, W] class indices in 0..C-1.
        alpha: float [C] per-class weights, or None for 1.
        valid: [B, H, W] pixel mask, or None for all pixels.
        gamma: focusing exponent; 0 gives the weighted cross entropy.
        reduction: 'mean' (plain mean over valid pixels), 'sum' or 'none' ([B, H, W]).

    Returns:
        A scalar, or [B, H, W] for reduction 'none'.
    """
    _check_softmax_inputs(logits, labels)
    nll = _per_pixel_nll(logits, labels)  # -log p_t
    weights = _gather_weights(alpha, labels, logits.shape[-1])
    one_minus_pt = -jnp.expm1(-nll)
    return _reduce(weights * jnp.power(one_minus_pt, gamma) * nll, valid, reduction)


def sigmoid_binary_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    pos_weight: jax.Array | None = None,
    valid: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Multi-label binary cross entropy from logits, as PyTorch's `BCEWithLogitsLoss`.

    Per element: `-(pos_weight[k] * t * log sigmoid(x) + (1 - t) * log(1 - sigmoid(x)))`.

    Args:
        logits: float [B, H, W, K] logits.
        targets: [B, H, W, K] targets in {0, 1} (any numeric or bool dtype).
        pos_weight: float [K] weight of the positive term per channel, or None for 1.
        valid: [B, H, W] pixel mask, or None for all pixels.
        reduction: 'mean' (over valid pixels and the K channels), 'sum', or 'none'
            ([B, H, W], summed over channels).

    Returns:
        A scalar, or [B, H, W] for reduction 'none'.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets shapes disagree: {logits.shape} vs {targets.shape}")
    logits = _at_least_f32(logits)
    targets = jnp.asarray(targets, logits.dtype)
    num_channels = logits.shape[-1]
    if pos_weight is None:
        pos_weight = jnp.ones((num_channels,), logits.dtype)
    pos_weight = jnp.asarray(pos_weight, logits.dtype)
    if pos_weight.shape != (num_channels,):
        raise ValueError(f"pos_weight must have shape ({num_channels},), got {pos_weight.shape}")
    per_element = -(
        pos_weight * targets * jax.nn.log_sigmoid(logits)
        + (1.0 - targets) * jax.nn.log_sigmoid(-logits)
    )
    per_pixel = jnp.sum(per_element, axis=-1)
    if reduction == "mean":
        return _reduce(per_pixel, valid, "mean") / num_channels
    return _reduce(per_pixel, valid, reduction)


def _soft_overlaps(predictions, targets, from_logits, activation, valid):
    """Per-class soft intersection and cardinality |P| + |T|, pooled over batch and pixels."""
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
    predictions = _at_least_f32(predictions)
    if from_logits:
        if activation == "sigmoid":
            probs = jax.nn.sigmoid(predictions)
        else:
            probs = jax.nn.softmax(predictions, axis=-1)
    else:
        probs = predictions
    if targets.ndim == probs.ndim - 1:  # integer labels -> one-hot
        targets = jax.nn.one_hot(targets, probs.shape[-1], dtype=probs.dtype)
    targets = jnp.asarray(targets, probs.dtype)
    if targets.shape != probs.shape:
        raise ValueError(
            f"predictions and targets shapes disagree: {probs.shape} vs {targets.shape}"
        )
    if valid is not None:
        mask = jnp.asarray(valid)[..., None] > 0
        probs = jnp.where(mask, probs, 0.0)
        targets = jnp.where(mask, targets, 0.0)
    axes = tuple(range(probs.ndim - 1))
    intersection = jnp.sum(probs * targets, axis=axes)
    cardinality = jnp.sum(probs + targets, axis=axes)
    return intersection, cardinality


def soft_dice_loss(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    from_logits: bool = True,
    activation: str = "sigmoid",
    smooth: float = 1.0,
    valid: jax.Array | None = None,
    channels: tuple[int, ...] | None = None,
) -> jax.Array:
    """1 - soft Dice, per class pooled over the batch and pixels, averaged over classes.

    Dice_c = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth).

    Args:
        predictions: float [B, H, W, C] logits (`from_logits=True`) or probabilities.
        targets: [B, H, W, C] in {0, 1}, or int [B, H, W] labels (one-hot encoded to C).
        from_logits: whether `predictions` are logits (then `activation` is applied).
        activation: 'sigmoid' (multi-label) or 'softmax' (over the last axis).
        smooth: additive smoothing of numerator and denominator.
        valid: [B, H, W] pixel mask, or None for all pixels.
        channels: the channels to average over (e.g. (1, 2, 3, 4, 5)); None for all.

    Returns:
        A scalar in [0, 1].
    """
    intersection, cardinality = _soft_overlaps(predictions, targets, from_logits, activation, valid)
    dice = (2.0 * intersection + smooth) / (cardinality + smooth)
    if channels is not None:
        dice = dice[jnp.asarray(channels)]
    return 1.0 - jnp.mean(dice)


def soft_jaccard_loss(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    from_logits: bool = True,
    activation: str = "sigmoid",
    smooth: float = 1.0,
    valid: jax.Array | None = None,
    channels: tuple[int, ...] | None = None,
) -> jax.Array:
    """1 - soft Jaccard (IoU), per class pooled over the batch and pixels, averaged over classes.

    IoU_c = (sum(p * t) + smooth) / (sum(p) + sum(t) - sum(p * t) + smooth). Arguments as
    `soft_dice_loss`.

    Args:
        predictions: float [B, H, W, C] logits (`from_logits=True`) or probabilities.
        targets: [B, H, W, C] in {0, 1}, or int [B, H, W] labels.
        from_logits: whether `predictions` are logits.
        activation: 'sigmoid' or 'softmax'.
        smooth: additive smoothing.
        valid: [B, H, W] pixel mask, or None.
        channels: the channels to average over; None for all.

    Returns:
        A scalar in [0, 1].
    """
    intersection, cardinality = _soft_overlaps(predictions, targets, from_logits, activation, valid)
    iou = (intersection + smooth) / (cardinality - intersection + smooth)
    if channels is not None:
        iou = iou[jnp.asarray(channels)]
    return 1.0 - jnp.mean(iou)


def bce_log_jaccard_loss(
    logits: jax.Array,
    targets: jax.Array,
    pos_weight: jax.Array | None = None,
    valid: jax.Array | None = None,
    *,
    jaccard_weight: float = 1.0,
    smooth: float = 1.0,
) -> jax.Array:
    """BCE - jaccard_weight * log(soft Jaccard), the Jaccard pooled over batch and structures.

    soft Jaccard = (sum(p * t) + smooth) / (sum(p) + sum(t) - sum(p * t) + smooth), every sum
    over the batch, the valid pixels AND the K structures (one number, not a mean of per-image
    or per-structure values). Both terms are >= 0 and tend to 0 as the probabilities tend to
    the targets, so a perfect prediction is the minimum.

    Args:
        logits: float [B, H, W, K] logits.
        targets: [B, H, W, K] targets in {0, 1}.
        pos_weight: float [K] BCE positive weights, or None for 1.
        valid: [B, H, W] pixel mask, or None for all pixels.
        jaccard_weight: weight of the -log(Jaccard) term.
        smooth: additive smoothing of the Jaccard (negligible against pooled pixel counts).

    Returns:
        The scalar loss.
    """
    bce = sigmoid_binary_cross_entropy(logits, targets, pos_weight, valid)
    intersection, cardinality = _soft_overlaps(logits, targets, True, "sigmoid", valid)
    intersection, cardinality = jnp.sum(intersection), jnp.sum(cardinality)
    jaccard = (intersection + smooth) / (cardinality - intersection + smooth)
    return bce - jaccard_weight * jnp.log(jaccard)


def compute_loss(
    loss_cfg: Mapping,
    logits: jax.Array,
    batch: Mapping[str, jax.Array],
    class_weights: jax.Array | None = None,
) -> jax.Array:
    """The training loss named by `loss_cfg.name` (see the module docstring for the names).

    Args:
        loss_cfg: `config.loss` (ConfigDict or mapping) with `name`, `gamma`, `dice_weight`,
            `jaccard_weight`.
        logits: float [B, H, W, C] model output (C = 6 softmax, C = 5 sigmoid).
        batch: mapping with `label` int [B, H, W] (softmax losses) or `structures` [B, H, W, K]
            (sigmoid losses), and optionally `valid` [B, H, W].
        class_weights: softmax losses: float [C] class weights; sigmoid losses: float [K]
            `pos_weight`; None for unweighted.

    Returns:
        The scalar loss.
    """
    name = loss_cfg.get("name", None)
    gamma = float(loss_cfg.get("gamma", 2.0))
    dice_weight = float(loss_cfg.get("dice_weight", 1.0))
    valid = batch.get("valid")
    if name in SOFTMAX_LOSSES:
        if "label" not in batch:
            raise KeyError(f"loss {name!r} needs batch['label']; batch has {sorted(batch)}")
        labels = batch["label"]
        if name == "thesis_focal":
            return thesis_focal_loss(logits, labels, class_weights, valid, gamma=gamma)
        if name == "focal":
            return focal_loss(logits, labels, class_weights, valid, gamma=gamma)
        loss = weighted_softmax_cross_entropy(logits, labels, class_weights, valid)
        if name == "weighted_ce_dice":
            loss = loss + dice_weight * soft_dice_loss(
                logits,
                labels,
                activation="softmax",
                valid=valid,
                channels=tuple(range(1, logits.shape[-1])),
            )
        return loss
    if name in SIGMOID_LOSSES:
        if "structures" not in batch:
            raise KeyError(f"loss {name!r} needs batch['structures']; batch has {sorted(batch)}")
        targets = batch["structures"]
        if name == "bce_log_jaccard":
            weight = float(loss_cfg.get("jaccard_weight", 1.0))
            return bce_log_jaccard_loss(
                logits, targets, class_weights, valid, jaccard_weight=weight
            )
        loss = sigmoid_binary_cross_entropy(logits, targets, class_weights, valid)
        if name == "bce_dice":
            loss = loss + dice_weight * soft_dice_loss(
                logits, targets, activation="sigmoid", valid=valid
            )
        return loss
    raise ValueError(f"unknown loss name {name!r}; expected one of {LOSS_NAMES}")
