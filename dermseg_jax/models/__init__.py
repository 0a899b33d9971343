"""Model construction from config, parameter groups and parameter counting.

`create_model(model_cfg, platform=...)` builds `InceptionUNet` from the config fields of
docs/design.md, with its kernel set and compute dtype resolved for the platform that will run
it (`layers.resolve_kernels`, `layers.resolve_dtype`); `param_groups(params)` labels each leaf
with its thesis group for per-group learning rates and freezing. This package never imports
TensorFlow or PyTorch (see `torch_baseline.py`).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dermseg_jax.models.inception_v3 import L1_LAYERS, L2_LAYERS, L3_LAYERS, InceptionV3Encoder
from dermseg_jax.models.layers import resolve_dtype, resolve_kernels
from dermseg_jax.models.unet import InceptionUNet, encoder_sizes

__all__ = [
    "GROUPS",
    "InceptionUNet",
    "InceptionV3Encoder",
    "abstract_variables",
    "count_params",
    "create_model",
    "param_groups",
    "replace_encoder",
    "split_outputs",
]

GROUPS = ("l1", "l2", "l3", "aspp", "decoder")
_MODEL_FIELDS = ("head", "width", "aspp_rates", "dropout_rate", "bn_momentum", "dtype")
_ENCODER_GROUP = {
    **{name: "l1" for name in L1_LAYERS},
    **{name: "l2" for name in L2_LAYERS},
    **{name: "l3" for name in L3_LAYERS},
}


def create_model(model_cfg: Any, platform: str | None = None) -> InceptionUNet:
    """Builds the network from a model config, for the platform that will run it.

    Args:
        model_cfg: a `ml_collections.ConfigDict` or dict with the fields `head`, `width`,
            `aspp_rates`, `dropout_rate`, `bn_momentum`, `dtype` ('auto' | 'float32' |
            'bfloat16') and optionally `kernels` ('auto' default | 'xla' | 'cpu_tuned') and
            `presence_head` (default False) (docs/design.md). Other fields (e.g. `encoder_only`) are ignored.
        platform: where the model will run: 'cpu', 'gpu', 'cuda', 'rocm' or 'tpu'; None =
            `jax.default_backend()`. A CPU host builds the GPU/TPU program (e.g. for
            `jax.export`) by naming that platform.

    Returns:
        An `InceptionUNet` with `kernels` and `dtype` resolved ('auto' -> 'cpu_tuned' and
        float32 on the CPU, 'xla' and bfloat16 elsewhere); `model.apply(variables,
        x [N, H, W, 3], train=...)` gives float32 logits [N, H, W, 6 or 5].
    """
    absent = object()
    kwargs = {field: model_cfg.get(field, absent) for field in _MODEL_FIELDS}
    missing = [field for field, value in kwargs.items() if value is absent]
    if missing:
        raise ValueError(f"model config lacks the field(s) {missing}; it needs {_MODEL_FIELDS}.")
    kwargs["aspp_rates"] = tuple(int(r) for r in kwargs["aspp_rates"])
    kwargs["width"] = float(kwargs["width"])
    kwargs["dropout_rate"] = float(kwargs["dropout_rate"])
    kwargs["bn_momentum"] = float(kwargs["bn_momentum"])
    # Optional: model directories written before the switch existed lack it.
    kwargs["kernels"] = resolve_kernels(str(model_cfg.get("kernels", "auto")), platform)
    kwargs["dtype"] = resolve_dtype(str(kwargs["dtype"]), platform)
    kwargs["presence_head"] = bool(model_cfg.get("presence_head", False))
    return InceptionUNet(**kwargs)


def split_outputs(outputs: Any) -> tuple[jax.Array, jax.Array | None]:
    """(logits, presence_logits or None) of a forward pass, with or without `presence_head`."""
    if isinstance(outputs, tuple):
        logits, presence = outputs
        return logits, presence
    return outputs, None


def abstract_variables(model_cfg: Any = None, *, encoder_only: bool = False) -> dict:
    """Shapes and dtypes of the model's variables (`jax.eval_shape`: nothing is computed).

    Args:
        model_cfg: config with `head`, `width`, `aspp_rates`, optional `presence_head` (the
            fields that set shapes);
            unused when `encoder_only`.
        encoder_only: only the encoder, as {'params': {'encoder': ...}, 'batch_stats': {...}}.

    Returns:
        {'params', 'batch_stats'} trees of `jax.ShapeDtypeStruct` (float32).
    """
    if encoder_only:
        encoder = InceptionV3Encoder()
        x = jnp.zeros((1, 128, 128, 3), jnp.float32)
        v = jax.eval_shape(lambda: encoder.init(jax.random.key(0), x, train=False))
        return {col: {"encoder": v[col]} for col in ("params", "batch_stats")}
    rates = tuple(int(r) for r in model_cfg["aspp_rates"])
    model = InceptionUNet(
        head=model_cfg["head"],
        width=float(model_cfg["width"]),
        aspp_rates=rates,
        kernels="xla",
        presence_head=bool(model_cfg.get("presence_head", False)),
    )
    # Shapes do not depend on the input size; pick one whose l2 map fits the largest rate.
    side = 128
    while encoder_sizes(side)[1] <= max(rates, default=0):
        side += 8
    x = jnp.zeros((1, side, side, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def param_groups(params: Any) -> Any:
    """Labels every leaf with its thesis group.

    Args:
        params: the model's `params` (or `batch_stats`) tree with top-level `encoder`, `aspp`,
            `decoder`.

    Returns:
        The same tree structure with string leaves in ('l1', 'l2', 'l3', 'aspp', 'decoder'):
        l1 = Conv2d_1a..2b, l2 = Conv2d_3b, 4a, l3 = Mixed_5b..5d. Usable as
        `optax.multi_transform` labels. The presence head (`presence/...`) belongs to
        'decoder': it is new on top of the encoder, like the decoder.
    """

    def label(path, _):
        keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        if keys and keys[0] == "encoder" and len(keys) > 1 and keys[1] in _ENCODER_GROUP:
            return _ENCODER_GROUP[keys[1]]
        if keys and keys[0] in ("aspp", "decoder"):
            return keys[0]
        if keys and keys[0] == "presence":
            return "decoder"
        raise ValueError(f"parameter {'/'.join(map(str, keys))} belongs to no group {GROUPS}.")

    return jax.tree_util.tree_map_with_path(label, params)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (every Flax parameter is used by the forward)."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(params)))


def replace_encoder(variables: dict, encoder_variables: dict) -> dict:
    """Returns `variables` with the encoder taken from `encoder_variables` (shapes checked).

    Args:
        variables: full model variables {'params', 'batch_stats'}.
        encoder_variables: {'params': {'encoder': ...}, 'batch_stats': {'encoder': ...}}, e.g.
            from `convert_torch.torchvision_to_flax_encoder` or an encoder-only model directory.

    Returns:
        A new variables dict; everything outside the encoder is unchanged.
    """
    out = {}
    for col in ("params", "batch_stats"):
        old, new = variables[col]["encoder"], encoder_variables[col]["encoder"]
        old_shapes = jax.tree_util.tree_map(np.shape, old)
        new_shapes = jax.tree_util.tree_map(np.shape, new)
        if old_shapes != new_shapes:
            raise ValueError(f"encoder {col} differ in structure or shapes from the model's.")
        out[col] = {**variables[col], "encoder": new}
    return out
