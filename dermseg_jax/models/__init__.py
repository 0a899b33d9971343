"""Model construction from config, parameter groups and parameter counting.

`create_model(model_cfg)` builds `InceptionUNet` from the config fields of docs/design.md;
`param_groups(params)` labels each leaf with its thesis group for per-group learning rates
and freezing. This package never imports TensorFlow or PyTorch (see `torch_baseline.py`).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dermseg_jax.models.inception_v3 import L1_LAYERS, L2_LAYERS, L3_LAYERS, InceptionV3Encoder
from dermseg_jax.models.unet import InceptionUNet, NarrowUNet, ThesisUNet, encoder_sizes

__all__ = [
    "GROUPS",
    "InceptionUNet",
    "InceptionV3Encoder",
    "NarrowUNet",
    "ThesisUNet",
    "abstract_variables",
    "count_params",
    "create_model",
    "param_groups",
    "replace_encoder",
]

GROUPS = ("l1", "l2", "l3", "aspp", "decoder")
_MODEL_FIELDS = ("head", "width", "aspp_rates", "dropout_rate", "bn_momentum", "dtype")
_ENCODER_GROUP = {
    **{name: "l1" for name in L1_LAYERS},
    **{name: "l2" for name in L2_LAYERS},
    **{name: "l3" for name in L3_LAYERS},
}


def _field(model_cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(model_cfg, dict):
        return model_cfg.get(name, default)
    return getattr(model_cfg, name, default)


def create_model(model_cfg: Any) -> InceptionUNet:
    """Builds the network from a model config.

    Args:
        model_cfg: a `ml_collections.ConfigDict`, dict or any object with the fields `head`,
            `width`, `aspp_rates`, `dropout_rate`, `bn_momentum`, `dtype` (docs/design.md).
            Optional: `deconv_impl` ('subpixel' default | 'xla', see `transposed_conv.py`).
            Other fields (e.g. `encoder_only`) are ignored.

    Returns:
        An `InceptionUNet`; `model.apply(variables, x [N, H, W, 3], train=...)` gives logits
        [N, H, W, 6 or 5].
    """
    absent = object()
    kwargs = {field: _field(model_cfg, field, absent) for field in _MODEL_FIELDS}
    missing = [field for field, value in kwargs.items() if value is absent]
    if missing:
        raise ValueError(f"model config lacks the field(s) {missing}; it needs {_MODEL_FIELDS}.")
    kwargs["aspp_rates"] = tuple(int(r) for r in kwargs["aspp_rates"])
    kwargs["width"] = float(kwargs["width"])
    kwargs["dropout_rate"] = float(kwargs["dropout_rate"])
    kwargs["bn_momentum"] = float(kwargs["bn_momentum"])
    kwargs["deconv_impl"] = str(_field(model_cfg, "deconv_impl", None) or "subpixel")
    return InceptionUNet(**kwargs)


def abstract_variables(model_cfg: Any = None, *, encoder_only: bool = False) -> dict:
    """Shapes and dtypes of the model's variables (`jax.eval_shape`: nothing is computed).

    Args:
        model_cfg: config with `head`, `width`, `aspp_rates` (the fields that set shapes);
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
    rates = tuple(int(r) for r in _field(model_cfg, "aspp_rates"))
    model = InceptionUNet(
        head=_field(model_cfg, "head"), width=float(_field(model_cfg, "width")), aspp_rates=rates
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
        `optax.multi_transform` labels.
    """

    def label(path, _):
        keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        if keys and keys[0] == "encoder" and len(keys) > 1 and keys[1] in _ENCODER_GROUP:
            return _ENCODER_GROUP[keys[1]]
        if keys and keys[0] in ("aspp", "decoder"):
            return keys[0]
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
