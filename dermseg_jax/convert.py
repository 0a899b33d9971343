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
and StepLR states, plain tensors/numbers/lists that this loader accepts. A file refused for other
pickled objects is named with the refused global and needs --unsafe-allow-pickle (runs arbitrary
code from the file: trusted files only); a refusal caused by a damaged file (its pickle stream
or zip archive does not check out) is reported as corrupt or truncated instead, since allowing
pickles would not help. Keys saved through `torch.nn.DataParallel` (`module.` prefix) are
accepted with a note, and tensors with NaN or infinite values are named in a warning.

    python -m dermseg_jax.convert --torch-checkpoint model.tar --out runs/thesis_model
"""

import argparse
import io
import os
import pickle
import pickletools
import re
import sys
import zipfile
from typing import Any

import torch  # noqa: I001  (torch before anything that might import TensorFlow)

from dermseg_jax import checkpointing, cli
from dermseg_jax.errors import UserError
from dermseg_jax.models import convert_torch

THESIS_DEFAULTS = {
    "aspp_rates": (2, 3, 4),
    "dropout_rate": 0.5,
    "bn_momentum": 0.992,
    "dtype": "float32",
}


# The legacy (non-zip) torch.save format is five pickles in a row, then the raw storages.
_LEGACY_PICKLES = 5
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_PROG = "convert"
_MAX_NAMED = 10


def _note(kind: str, message: str) -> None:
    print(f"{_PROG}: {kind}: {message}", file=sys.stderr)


def _reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = next((line for line in lines if "WeightsUnpickler error" in line), None)
    text = detail or (lines[0] if lines else "")
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


def find_damage(path: str) -> str | None:
    """What is structurally wrong with a torch.save file, if anything.

    Walks the file's pickle stream(s) opcode by opcode (without unpickling anything) and, for a
    zip archive, checks every member's CRC; a truncated or corrupted file fails one of them.
    This tells a damaged file from one that `torch.load(weights_only=True)` refuses for its
    pickled objects, which torch reports alike.

    Args:
        path: a file that starts like torch.save output (zip archive or pickle).

    Returns:
        The problem found (one line), or None when the file checks out.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                return f"zip member {bad} fails its CRC check"
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                return "zip archive without a data.pkl"
            streams = [(n, io.BytesIO(archive.read(n)), 1) for n in names]
    else:
        with open(path, "rb") as f:
            streams = [("pickle stream", io.BytesIO(f.read()), _LEGACY_PICKLES)]
    for name, stream, count in streams:
        try:
            for _ in range(count):
                for _op in pickletools.genops(stream):
                    pass
        except ValueError as e:
            return f"{name}: {e}"
    return None


def load_torch_file(path: str, *, allow_pickle: bool = False) -> Any:
    """Reads a PyTorch file on the CPU.

    Args:
        path: file written by `torch.save`.
        allow_pickle: fall back to `weights_only=False` (arbitrary code; trusted files only).

    Raises:
        UserError: if the file is missing, not a torch.save file, corrupt or truncated, or
            refused by `torch.load(weights_only=True)` (naming the refused global).
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (legacy: a pickle, protocol >= 2, starting with 0x80).
    if head == b"PK" and not zipfile.is_zipfile(path):
        raise UserError(
            f"{path}: corrupt or truncated PyTorch file (a zip archive without its directory)",
            hint="copy or download the file again",
        )
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise UserError(f"{path}: not a PyTorch file (neither a torch.save zip nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files.
        error = e
    problem = find_damage(path)
    refused = isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower()
    if problem or not refused:
        raise UserError(
            f"{path}: corrupt or truncated PyTorch file ({problem or _reason(error)})",
            hint="copy or download the file again",
        ) from error
    if not allow_pickle:
        found = _REFUSED_GLOBAL.search(str(error))
        what = f"a pickled {found.group(1)}" if found else f"pickled data ({_reason(error)})"
        raise UserError(
            f"{path}: holds {what}, which torch.load(weights_only=True) refuses",
            hint="if you trust the file, rerun with --unsafe-allow-pickle (runs code from it)",
        ) from error
    _note("warning", f"loading {path} with weights_only=False: it may run code from the file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - as above
        raise UserError(f"{path}: cannot be unpickled ({_reason(e)})") from e


def extract_state_dict(obj: Any, source: str) -> dict:
    """The state dict inside a loaded file (`obj['model_state_dict']` or `obj` itself).

    Raises:
        UserError: if `obj` is neither, naming the top-level keys found.
    """
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
        source = f"{source}['model_state_dict']"
    if isinstance(obj, dict) and obj and all(hasattr(v, "shape") for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        found = ", ".join(map(repr, list(obj)[:10])) or "none"
        raise UserError(
            f"{source} is neither a state dict of tensors nor a checkpoint dict with "
            f"'model_state_dict' (top-level keys: {found})"
        )
    raise UserError(f"{source} holds a {type(obj).__name__}, not a state dict")


def read_state_dict(path: str, *, allow_pickle: bool = False) -> dict:
    """The state dict of a PyTorch file, without DataParallel's `module.` key prefix (noted).

    Raises:
        UserError: see `load_torch_file` and `extract_state_dict`.
    """
    state_dict = extract_state_dict(load_torch_file(path, allow_pickle=allow_pickle), path)
    state_dict, stripped = convert_torch.strip_data_parallel_prefix(state_dict)
    if stripped:
        _note(
            "note",
            f"{path}: every key has the 'module.' prefix of a DataParallel model; read without it",
        )
    return state_dict


def warn_non_finite(source: str, state_dict: dict) -> list[str]:
    """Warns (one line on stderr) about tensors holding NaN or inf; returns their descriptions."""
    found = convert_torch.non_finite_tensors(state_dict)
    if found:
        shown = ", ".join(found[:_MAX_NAMED]) + (" ..." if len(found) > _MAX_NAMED else "")
        _note("warning", f"{source}: non-finite values in {len(found)} tensor(s): {shown}")
    return found


def _check_out_model_dir(out: str, overwrite: bool) -> None:
    if checkpointing.is_model_dir(out) and not overwrite:
        raise UserError(f"{out} already holds a model", hint="pass --overwrite to replace it")


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

    Raises:
        UserError: unreadable file, weights that do not fit, or `out` holds a model already
            and not `overwrite`.
    """
    _check_out_model_dir(out, overwrite)
    state_dict = read_state_dict(path, allow_pickle=allow_pickle)
    state_dict = convert_torch.strip_inception_aliases(state_dict)
    detected = convert_torch.detect_model_config(state_dict, source=path)
    if head is not None and head != detected["head"]:
        raise UserError(f"{path} has a {detected['head']} head, but --head {head} was given")
    warn_non_finite(path, state_dict)
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
    _check_out_model_dir(out, overwrite)
    state_dict = read_state_dict(path, allow_pickle=allow_pickle)
    warn_non_finite(path, state_dict)
    variables = convert_torch.torchvision_to_flax_encoder(state_dict, source=path)
    model_cfg = {"encoder_only": True, "source": "torchvision inception_v3"}
    checkpointing.save_model(out, variables, model_cfg, overwrite=overwrite)


def export_to_torch(model_dir: str, out: str, *, overwrite: bool = False) -> None:
    """Writes a model directory as a thesis-format PyTorch checkpoint dict.

    Raises:
        UserError: `out` exists and not `overwrite`, its folder is missing, or the model
            directory is unusable, holds an encoder only or has a presence head.
    """
    if os.path.lexists(out) and not overwrite:
        raise UserError(f"{out}: already exists", hint="pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"{out}: the folder {folder} does not exist")
    model_cfg, variables = checkpointing.load_model(model_dir)
    if model_cfg.get("encoder_only", False):
        raise UserError(f"{model_dir} holds encoder weights only; nothing to export")
    if model_cfg.get("presence_head", False):
        raise UserError(
            f"{model_dir} has a presence head (model.presence_head), which the thesis' PyTorch "
            "network lacks; nothing was written"
        )
    state_dict = convert_torch.flax_to_torch(variables)
    warn_non_finite(model_dir, state_dict)
    partial = f"{out}.partial"
    torch.save(
        {
            "model_state_dict": {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()},
            "model_config": model_cfg.to_dict(),
        },
        partial,
    )
    os.replace(partial, out)


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
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.to_torch:
        export_to_torch(args.model_dir, args.out, overwrite=args.overwrite)
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
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns 0, or exits with status 2 and one line for a user error."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.to_torch and not args.model_dir:
        parser.error("--to-torch needs --model-dir DIR")
    cli.guard(lambda: _run(args), debug=args.debug, prog=_PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
