"""CLI: PyTorch weights <-> dermseg_jax model directories.

Input kinds:
  --torch-checkpoint FILE     a thesis checkpoint (`.tar` dict with `model_state_dict`, as the
                              thesis notebook saves it, or a bare thesis-format state dict)
                              -> --out DIR, a model directory for `dermseg_jax.load_checkpoint`.
  --torchvision-inception F   a torchvision `inception_v3` state dict (e.g. ImageNet weights)
                              -> --out DIR, an encoder-only model directory
                              (`model_config.json` has `encoder_only: true`; its variables are
                              {'params': {'encoder'}, 'batch_stats': {'encoder'}}) to initialise
                              training from (`config.init_from`).
  --to-torch --model-dir DIR  a model directory -> --out FILE.pt, a thesis-format dict
                              {'model_state_dict', 'model_config'} that
                              `torch_baseline.InceptionUNetTorch` loads strictly.

Files are read with `torch.load(..., weights_only=True)`: the thesis' `.tar` also holds the Adam
and StepLR states, plain tensors/numbers/lists that this loader accepts. Files with other
pickled objects need --unsafe-allow-pickle (runs arbitrary code from the file: trusted files
only).

    python -m dermseg_jax.convert --torch-checkpoint model.tar --out runs/thesis_model
"""

import argparse
import os
import pickle
import sys
import zipfile
from typing import Any

import torch  # noqa: I001  (torch before anything that might import TensorFlow)
from absl import logging

from dermseg_jax import checkpointing
from dermseg_jax.models import convert_torch

THESIS_DEFAULTS = {
    "aspp_rates": (2, 3, 4),
    "dropout_rate": 0.5,
    "bn_momentum": 0.992,
    "dtype": "float32",
}


def load_torch_file(path: str, *, allow_pickle: bool = False) -> Any:
    """Reads a PyTorch file on the CPU.

    Args:
        path: file written by `torch.save`.
        allow_pickle: fall back to `weights_only=False` (arbitrary code; trusted files only).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not a file `torch.load` can read safely.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file.")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (legacy: a pickle, protocol >= 2, starting with 0x80).
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise ValueError(f"{path} is not a PyTorch file (neither a torch.save zip nor a pickle).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "weights_only" not in str(e):
            raise ValueError(f"{path} is not a PyTorch file readable by torch.load: {e}") from e
        if not allow_pickle:
            raise ValueError(
                f"{path} holds pickled objects other than tensors and plain containers, which "
                "torch.load(weights_only=True) refuses; if you trust the file, rerun with "
                f"--unsafe-allow-pickle. ({str(e).splitlines()[0]})"
            ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for non-torch files.
        raise ValueError(f"{path} is not a PyTorch file readable by torch.load: {e}") from e
    logging.warning("Loading %s with weights_only=False: it may run code from the file.", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def extract_state_dict(obj: Any, source: str) -> dict:
    """The state dict inside a loaded file (`obj['model_state_dict']` or `obj` itself).

    Raises:
        ValueError: if `obj` is neither, naming the top-level keys found.
    """
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
        source = f"{source}['model_state_dict']"
    if isinstance(obj, dict) and obj and all(hasattr(v, "shape") for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        found = ", ".join(map(repr, list(obj)[:10])) or "none"
        raise ValueError(
            f"{source} is neither a state dict of tensors nor a checkpoint dict with "
            f"'model_state_dict' (top-level keys: {found})."
        )
    raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict.")


def convert_thesis_checkpoint(
    path: str,
    out: str,
    *,
    width: float | None = None,
    head: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    **model_fields: Any,
) -> dict:
    """Converts a thesis checkpoint into a model directory; returns the model config written.

    Args:
        path: `.tar`/`.pt` file (dict with `model_state_dict`, or a bare state dict).
        out: model directory to write.
        width: ASPP/decoder width; detected from the shapes when None.
        head: 'softmax'|'sigmoid'; detected when None (a conflicting value is an error).
        overwrite: replace an existing model directory.
        allow_pickle: see `load_torch_file`.
        **model_fields: aspp_rates, dropout_rate, bn_momentum, dtype (thesis defaults).
    """
    state_dict = extract_state_dict(load_torch_file(path, allow_pickle=allow_pickle), path)
    state_dict = convert_torch.strip_inception_aliases(state_dict)
    detected = convert_torch.detect_model_config(state_dict, source=path)
    if head is not None and head != detected["head"]:
        raise ValueError(f"{path} has a {detected['head']} head, but --head {head} was given.")
    model_cfg = {**THESIS_DEFAULTS, **{k: v for k, v in model_fields.items() if v is not None}}
    model_cfg.update(head=detected["head"], width=detected["width"] if width is None else width)
    model_cfg["aspp_rates"] = tuple(model_cfg["aspp_rates"])
    variables = convert_torch.torch_to_flax(state_dict, model_cfg, source=path)
    checkpointing.save_model(out, variables, model_cfg, overwrite=overwrite)
    return model_cfg


def convert_torchvision_inception(
    path: str, out: str, *, overwrite: bool = False, allow_pickle: bool = False
) -> None:
    """Converts a torchvision inception_v3 state dict into an encoder-only model directory."""
    state_dict = extract_state_dict(load_torch_file(path, allow_pickle=allow_pickle), path)
    variables = convert_torch.torchvision_to_flax_encoder(state_dict, source=path)
    model_cfg = {"encoder_only": True, "source": "torchvision inception_v3"}
    checkpointing.save_model(out, variables, model_cfg, overwrite=overwrite)


def export_to_torch(model_dir: str, out: str) -> None:
    """Writes a model directory as a thesis-format PyTorch checkpoint dict."""
    model_cfg, variables = checkpointing.load_model(model_dir)
    if model_cfg.get("encoder_only", False):
        raise ValueError(f"{model_dir} holds encoder weights only; nothing to export.")
    state_dict = convert_torch.flax_to_torch(variables)
    torch.save(
        {
            "model_state_dict": {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()},
            "model_config": model_cfg.to_dict(),
        },
        out,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dermseg_jax.convert",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--torch-checkpoint",
        metavar="FILE",
        help="thesis checkpoint (.tar with model_state_dict, or a bare state dict) -> model dir",
    )
    mode.add_argument(
        "--torchvision-inception",
        metavar="FILE",
        help="torchvision inception_v3 state dict (.pth) -> encoder-only model dir",
    )
    mode.add_argument(
        "--to-torch", action="store_true", help="model dir (--model-dir) -> thesis-format .pt"
    )
    parser.add_argument("--model-dir", help="model directory to export (with --to-torch)")
    parser.add_argument("--out", required=True, help="output directory, or file for --to-torch")
    parser.add_argument("--width", type=float, help="decoder width (default: from the shapes)")
    parser.add_argument("--head", choices=("softmax", "sigmoid"), help="default: from shapes")
    parser.add_argument(
        "--aspp-rates",
        type=lambda s: tuple(int(r) for r in s.split(",")),
        help="ASPP dilation rates, e.g. 2,3,4 (thesis); not stored in PyTorch files",
    )
    parser.add_argument("--dropout-rate", type=float, help="default 0.5 (thesis)")
    parser.add_argument("--bn-momentum", type=float, help="Flax convention, default 0.992")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--unsafe-allow-pickle",
        action="store_true",
        help="load with torch.load(weights_only=False): runs code from the file",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.to_torch:
            if not args.model_dir:
                raise ValueError("--to-torch needs --model-dir DIR.")
            export_to_torch(args.model_dir, args.out)
        elif args.torchvision_inception:
            convert_torchvision_inception(
                args.torchvision_inception,
                args.out,
                overwrite=args.overwrite,
                allow_pickle=args.unsafe_allow_pickle,
            )
        else:
            cfg = convert_thesis_checkpoint(
                args.torch_checkpoint,
                args.out,
                width=args.width,
                head=args.head,
                overwrite=args.overwrite,
                allow_pickle=args.unsafe_allow_pickle,
                aspp_rates=args.aspp_rates,
                dropout_rate=args.dropout_rate,
                bn_momentum=args.bn_momentum,
                dtype=args.dtype,
            )
            print(f"model config: {cfg}")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
