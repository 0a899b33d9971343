"""PyTorch state dicts <-> Flax variables for `InceptionUNet` (pure functions, no torch import).

Two PyTorch formats are read:
- thesis format: the keys of the thesis' `unet_inception` (= `torch_baseline.InceptionUNetTorch`):
  `l1.0.conv.weight` ... `l3.3.branch_pool.bn.running_var`, `a1.0.weight` ..., `l5.*`, `l6.*`,
  `l7.*`. The thesis' real checkpoints also hold the whole torchvision network under
  `inception.*` (aliases of l1/l2/l3 plus the unused Mixed_6*, Mixed_7*, AuxLogits, fc): those
  keys are ignored whenever the `l1.`/`l2.`/`l3.` keys are present, and used for the encoder
  only when those are missing entirely.
- torchvision format: an `inception_v3` state dict (`Conv2d_1a_3x3.conv.weight`, ...), read for
  the encoder only (initialisation from ImageNet weights); the layers past Mixed_5d are ignored.

Layouts: conv OIHW -> HWIO and ConvTranspose [in, out, kh, kw] -> [kh, kw, out, in] are both
`transpose(2, 3, 1, 0)` (see `layers.ConvTranspose`); BatchNorm weight/bias/running_mean/
running_var -> scale/bias/mean/var; `num_batches_tracked` is dropped (momentum is fixed, so it
is never read). Values may be numpy arrays or CPU torch tensors. Errors are `UserError`s of one
line (the key listings are capped), since the CLI shows only one line.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dermseg_jax.errors import UserError
from dermseg_jax.models import abstract_variables
from dermseg_jax.models.unet import HEAD_CHANNELS, scaled

# Encoder layer -> its prefix in the thesis' Sequentials (index 0 of l2 and l3 is a max pool).
THESIS_ENCODER_PREFIX = {
    "Conv2d_1a_3x3": "l1.0",
    "Conv2d_2a_3x3": "l1.1",
    "Conv2d_2b_3x3": "l1.2",
    "Conv2d_3b_1x1": "l2.1",
    "Conv2d_4a_3x3": "l2.2",
    "Mixed_5b": "l3.1",
    "Mixed_5c": "l3.2",
    "Mixed_5d": "l3.3",
}
# Decoder module -> index in the thesis' Sequentials (ReLU and Dropout2d take the others).
_DECODER_INDEX = {
    "l5": {"deconv": 0, "deconv_bn": 1, "conv": 3, "conv_bn": 4},
    "l6": {"deconv": 0, "deconv_bn": 1, "conv": 4, "conv_bn": 5},
    "l7": {"deconv": 0, "deconv_bn": 1, "conv": 3, "conv_bn": 4},
}
_HEAD_INDEX = {"head": "l7.6", "head_bn": "l7.7"}
_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# torchvision inception_v3 parts the encoder does not use.
_TORCHVISION_UNUSED = re.compile(r"^(Mixed_6|Mixed_7|AuxLogits\.|fc\.)")
_MAX_LISTED = 20
# torch.nn.DataParallel and DistributedDataParallel save every key under this prefix.
DATA_PARALLEL_PREFIX = "module."


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; avoids importing torch here.
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def torch_key(collection: str, path: tuple[str, ...], *, torchvision_names: bool = False) -> str:
    """PyTorch key of a Flax variable.

    Args:
        collection: 'params' or 'batch_stats'.
        path: the variable's path, e.g. ('encoder', 'Mixed_5b', 'branch1x1', 'conv', 'kernel').
        torchvision_names: encoder keys in torchvision's naming instead of the thesis'.

    Returns:
        e.g. 'l3.1.branch1x1.conv.weight' (thesis) or 'Mixed_5b.branch1x1.conv.weight'.
    """
    leaf = _LEAF[(collection, path[-1])]
    top, modules = path[0], list(path[1:-1])
    if top == "encoder":
        prefix = modules[0] if torchvision_names else THESIS_ENCODER_PREFIX[modules[0]]
        return ".".join([prefix, *modules[1:], leaf])
    if top == "aspp":
        branch = int(modules[0].removeprefix("branch"))
        layer = int(modules[1][-1])
        index = 3 * (layer - 1) + (1 if modules[1].startswith("bn") else 0)
        return f"a{branch}.{index}.{leaf}"
    if top == "decoder":
        if modules[0] in _HEAD_INDEX:
            return f"{_HEAD_INDEX[modules[0]]}.{leaf}"
        return f"{modules[0]}.{_DECODER_INDEX[modules[0]][modules[1]]}.{leaf}"
    raise ValueError(f"unknown top-level module {top!r} in {path}.")


def _flat_shapes(abstract: Mapping) -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
    out = {}
    for col in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract[col])[0]:
            out[(col, tuple(p.key for p in path))] = tuple(leaf.shape)
    return out


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array


def _convert(state_dict, abstract, ignorable, *, torchvision_names, source):
    expected = {
        torch_key(col, path, torchvision_names=torchvision_names): (col, path, shape)
        for (col, path), shape in _flat_shapes(abstract).items()
    }
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = set(expected) - set(given)
    unexpected = {k for k in set(given) - set(expected) if not ignorable(k)}
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    out = {"params": {}, "batch_stats": {}}
    for key, (col, path, shape) in expected.items():
        if key not in given:
            continue
        array = _to_numpy(given[key])
        want = _to_torch_layout(np.empty(shape, np.bool_)).shape
        if array.shape != want:
            problems.append(f"shape mismatch for {key}: file has {array.shape}, model wants {want}")
            continue
        node = out[col]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(_to_flax_layout(array)).astype(np.float32)
    if problems:
        raise UserError(f"{source} does not match the model: " + "; ".join(problems))
    return out


def strip_data_parallel_prefix(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Removes the `module.` prefix that a DataParallel-wrapped model puts on every key.

    Args:
        state_dict: any state dict.

    Returns:
        (the state dict, whether the prefix was removed); only removed when every key has it.
    """
    if state_dict and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
        return {k.removeprefix(DATA_PARALLEL_PREFIX): v for k, v in state_dict.items()}, True
    return dict(state_dict), False


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """`'<key> (<n> NaN, <m> inf)'` for every floating-point tensor with non-finite values."""
    found = []
    for key in sorted(state_dict):
        array = _to_numpy(state_dict[key])
        if not np.issubdtype(array.dtype, np.floating):
            continue
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        if nan or inf:
            found.append(f"{key} ({nan} NaN, {inf} inf)")
    return found


def strip_inception_aliases(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops the thesis checkpoints' `inception.*` keys (or maps them to l1/l2/l3 if needed).

    Args:
        state_dict: a thesis-format state dict, possibly with the `inception.*` copy of the
            torchvision network.

    Returns:
        A state dict `torch_baseline.InceptionUNetTorch` loads strictly: without `inception.*`,
        and with l1/l2/l3 keys taken from `inception.*` when the file had none.
    """
    has_encoder = any(k.startswith(("l1.", "l2.", "l3.")) for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("inception."):
            out[key] = value
            continue
        if has_encoder:
            continue
        layer, _, rest = key.removeprefix("inception.").partition(".")
        if layer in THESIS_ENCODER_PREFIX:
            out[f"{THESIS_ENCODER_PREFIX[layer]}.{rest}"] = value
    return out


def detect_model_config(state_dict: Mapping[str, Any], *, source: str = "state dict") -> dict:
    """Reads head, width and the number of ASPP branches off a thesis-format state dict.

    Args:
        state_dict: thesis-format state dict.
        source: name used in error messages (e.g. the file name).

    Returns:
        {'head': 'softmax'|'sigmoid', 'width': float, 'num_aspp_branches': int}.

    Raises:
        UserError: if the keys or shapes do not look like the thesis network.
    """

    def shape(key):
        if key not in state_dict:
            raise UserError(
                f"{source} is not a thesis-format state dict: key {key!r} is missing "
                f"(keys found: {_listing(state_dict)})"
            )
        return tuple(_to_numpy(state_dict[key]).shape)

    num_classes = shape("l7.6.weight")[0]
    heads = {c: h for h, c in HEAD_CHANNELS.items()}
    if num_classes not in heads:
        raise UserError(
            f"{source}: the head l7.6.weight has {num_classes} outputs; expected 6 (softmax) or "
            "5 (sigmoid)"
        )
    branches = 0
    while f"a{branches + 1}.0.weight" in state_dict:
        branches += 1
    if branches == 0:
        shape("a1.0.weight")
    found = {
        256: shape("a1.0.weight")[0],
        800: shape("l5.0.weight")[1],
        512: shape("l5.3.weight")[0],
        704: shape("l6.0.weight")[1],
    }
    candidates = [1.0] + [n / c for c, n in found.items()]
    for width in candidates:
        if all(scaled(c, width) == n for c, n in found.items()):
            return {"head": heads[num_classes], "width": width, "num_aspp_branches": branches}
    raise UserError(
        f"{source}: no width multiplier explains the channel counts "
        f"{ {f'thesis {c}': n for c, n in found.items()} }",
        hint="pass the width with --width",
    )


def torch_to_flax(
    state_dict: Mapping[str, Any], model_cfg: Mapping, *, source: str = "state dict"
) -> dict:
    """Converts a thesis-format state dict to Flax variables.

    Args:
        state_dict: thesis-format state dict (`inception.*` aliases allowed).
        model_cfg: dict with head, width, aspp_rates of the target model.
        source: name used in error messages.

    Returns:
        {'params', 'batch_stats'} nested dicts of float32 numpy arrays.

    Raises:
        UserError: listing missing keys, unexpected keys and shape mismatches (one line).
    """
    branches = sum(1 for k in state_dict if re.fullmatch(r"a\d+\.0\.weight", k))
    rates = tuple(model_cfg["aspp_rates"])
    if branches and branches != len(rates):
        raise UserError(
            f"{source} has {branches} ASPP branches (a1..a{branches}) but the model config's "
            f"aspp_rates {rates} ask for {len(rates)}",
            hint="pass matching rates with --aspp-rates",
        )
    return _convert(
        strip_inception_aliases(state_dict),
        abstract_variables(model_cfg),
        lambda key: False,
        torchvision_names=False,
        source=source,
    )


def torchvision_to_flax_encoder(
    state_dict: Mapping[str, Any], *, source: str = "state dict"
) -> dict:
    """Converts a torchvision `inception_v3` state dict to the encoder's Flax variables.

    Args:
        state_dict: torchvision Inception v3 state dict (with or without AuxLogits).
        source: name used in error messages.

    Returns:
        {'params': {'encoder': ...}, 'batch_stats': {'encoder': ...}} of float32 numpy arrays;
        merge into a model with `dermseg_jax.models.replace_encoder`.
    """
    if any(k.startswith(("l1.", "l3.", "a1.")) for k in state_dict):
        source += " (looks like a thesis checkpoint: convert it with --torch-checkpoint)"
    return _convert(
        state_dict,
        abstract_variables(encoder_only=True),
        lambda key: bool(_TORCHVISION_UNUSED.match(key)),
        torchvision_names=True,
        source=source,
    )


def flax_to_torch(variables: Mapping) -> dict[str, np.ndarray]:
    """Converts Flax variables to a thesis-format state dict (exact inverse of torch_to_flax).

    Args:
        variables: {'params', 'batch_stats'} of an `InceptionUNet`.

    Returns:
        Thesis-format state dict of numpy arrays (float32), including `num_batches_tracked`
        (0, int64) for every BatchNorm so that PyTorch loads it strictly.
    """
    out = {}
    for col in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[col])[0]:
            path = tuple(p.key for p in path)
            if path[0] not in ("encoder", "aspp", "decoder"):
                raise UserError(f"unknown variable {col}/{'/'.join(path)} in the model")
            key = torch_key(col, path)
            out[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(leaf)))
            if col == "batch_stats" and path[-1] == "mean":
                out[key.replace("running_mean", "num_batches_tracked")] = np.array(0, np.int64)
    return out
