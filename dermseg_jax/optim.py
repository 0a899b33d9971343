"""The optimizer: per-group learning rates, freezing, weight decay, clipping and schedules.

Parameter groups come from `models.param_groups(params)` ('l1', 'l2', 'l3', 'aspp', 'decoder').
A group whose learning rate is 0 or None is frozen: `optax.set_to_zero()` (no update, and no
Adam moments allocated for it), and `trainer.train_step` does not differentiate it
(`frozen_groups`), so no backward pass runs into it. Every trainable group runs its own Adam with
`lr_group * schedule(step)`, where the schedule is a multiplier starting at 1.
"""

from collections.abc import Callable

import jax
import ml_collections
import optax

from dermseg_jax import models
from dermseg_jax.models import GROUPS

SCHEDULES = ("constant", "thesis_step", "step_per_epoch", "warmup_cosine")
_FROZEN = "frozen"


def group_learning_rates(optim_cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Returns {group: peak learning rate} of the trainable groups (frozen groups left out)."""
    rates = {}
    for group in GROUPS:
        lr = optim_cfg.get(f"lr_{group}")
        if lr is not None and lr < 0:
            raise ValueError(f"config.optim.lr_{group}={lr} must be >= 0 (0 or None = frozen)")
        if lr:
            rates[group] = float(lr)
    if not rates:
        raise ValueError("config.optim: every parameter group is frozen (all lr_* are 0/None)")
    return rates


ENCODER_GROUPS = ("l1", "l2", "l3")


def apply_encoder_lr_without_init(config: ml_collections.ConfigDict) -> bool:
    """`optim.encoder_lr_without_init`: the encoder's learning rate when it starts random.

    Recipes tuned for an ImageNet-initialised encoder give it small learning rates (isic2018:
    1e-5, 1e-5, 1e-4); started from scratch (no `init_from`) such an encoder hardly moves
    (docs/ablation_isic2018.md). When the field is set (not None or 0) and `init_from` is empty,
    lr_l1, lr_l2 and lr_l3 are set to it, in `config` itself, so `config.json` records what was
    used.

    Returns:
        Whether the learning rates were replaced.
    """
    lr = config.optim.get("encoder_lr_without_init", None)
    if not lr or config.get("init_from"):
        return False
    for group in ENCODER_GROUPS:
        config.optim[f"lr_{group}"] = float(lr)
    return True


def frozen_groups(optim_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The groups whose learning rate is 0 or None, in `GROUPS` order."""
    rates = group_learning_rates(optim_cfg)
    return tuple(g for g in GROUPS if g not in rates)


def create_schedule_fn(
    optim_cfg: ml_collections.ConfigDict, *, steps_per_epoch: int, num_train_steps: int
) -> Callable[[jax.Array], jax.Array]:
    """The learning-rate multiplier as a function of the optimizer step (1 = peak).

    - 'constant': 1 (after the warm-up).
    - 'thesis_step': StepLR stepped after every batch (defect 2): gamma ** (step // step_size).
    - 'step_per_epoch': StepLR stepped per epoch: gamma ** (epoch // step_size).
    - 'warmup_cosine': cosine decay to 0 at `num_train_steps`.
    All but 'thesis_step' start with a linear warm-up of `warmup_steps` from 0.

    Args:
        optim_cfg: `config.optim`.
        steps_per_epoch: optimizer steps per epoch.
        num_train_steps: total optimizer steps.

    Returns:
        schedule_fn(step) -> scalar multiplier.
    """
    name = optim_cfg.schedule
    gamma = float(optim_cfg.step_gamma)
    step_size = int(optim_cfg.step_size)
    warmup = int(optim_cfg.get("warmup_steps") or 0)
    if name == "thesis_step":
        return optax.exponential_decay(1.0, step_size, gamma, staircase=True)
    if name == "constant":
        main = optax.constant_schedule(1.0)
    elif name == "step_per_epoch":
        # Counted from the start of training (not of the post-warm-up phase), like StepLR.
        main = optax.exponential_decay(
            1.0, step_size * steps_per_epoch, gamma, staircase=True, transition_begin=0
        )
    elif name == "warmup_cosine":
        main = optax.cosine_decay_schedule(1.0, max(num_train_steps - warmup, 1))
    else:
        raise ValueError(f"config.optim.schedule={name!r}; expected one of {SCHEDULES}")
    if not warmup:
        return main
    if name == "step_per_epoch":

        def schedule_fn(step):
            return main(step) * jax.numpy.minimum(1.0, (step + 1) / warmup)

        return schedule_fn
    warm = optax.linear_schedule(1.0 / warmup, 1.0, warmup)
    return optax.join_schedules([warm, main], [warmup])


def _group_tx(
    optim_cfg: ml_collections.ConfigDict, lr: float, schedule_fn: Callable
) -> optax.GradientTransformation:
    weight_decay = float(optim_cfg.weight_decay or 0.0)

    def learning_rate_fn(step):
        return lr * schedule_fn(step)

    if optim_cfg.optimizer == "adam":
        # torch.optim.Adam's weight_decay: L2 added to the gradient before the moments.
        parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        parts.append(optax.scale_by_adam())
    elif optim_cfg.optimizer == "adamw":
        parts = [optax.scale_by_adam()]
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))
    else:
        raise ValueError(f"config.optim.optimizer={optim_cfg.optimizer!r}; expected adam|adamw")
    parts.append(optax.scale_by_learning_rate(learning_rate_fn))
    return optax.chain(*parts)


def create_optimizer(
    optim_cfg: ml_collections.ConfigDict, *, steps_per_epoch: int, num_train_steps: int
) -> optax.GradientTransformation:
    """Builds the optimizer over the model's parameter groups.

    Args:
        optim_cfg: `config.optim`.
        steps_per_epoch: optimizer steps per epoch (for 'step_per_epoch').
        num_train_steps: total optimizer steps (for 'warmup_cosine').

    Returns:
        An optax transformation for the model's `params` pytree.
    """
    rates = group_learning_rates(optim_cfg)
    schedule_fn = create_schedule_fn(
        optim_cfg, steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps
    )

    def label_fn(params):
        groups = models.param_groups(params)
        return jax.tree.map(lambda g: g if g in rates else _FROZEN, groups)

    transforms = {g: _group_tx(optim_cfg, lr, schedule_fn) for g, lr in rates.items()}
    transforms[_FROZEN] = optax.set_to_zero()
    tx = optax.multi_transform(transforms, label_fn)
    clip = optim_cfg.get("grad_clip_norm")
    if clip:
        # Zero frozen gradients first, so the clipping norm counts trainable parameters only.
        zero_frozen = optax.multi_transform(
            {**{g: optax.identity() for g in rates}, _FROZEN: optax.set_to_zero()}, label_fn
        )
        tx = optax.chain(zero_frozen, optax.clip_by_global_norm(float(clip)), tx)
    return tx
