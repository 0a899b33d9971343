"""Start-up checks of training and evaluation: every input a run needs, before anything is written.

A run that would fail later (a validation split that does not exist, after hours of training; a
batch that does not split over the devices; a workdir path that is a file) fails here instead,
with one `UserError` naming the flag or file, and leaves no half-made workdir behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import jax
import ml_collections

from dermseg_jax import sharding
from dermseg_jax.errors import UserError

PREPARE_HINT = (
    "prepare it with `python -m dermseg_jax.data.prepare ...` (see --help), or set "
    "--config.data.data_dir=None for the built-in synthetic set"
)


def check_workdir(workdir: str) -> None:
    """The run directory is absent or a directory (never a file)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir}: not a directory", hint="pass a directory path")


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, flag: str) -> int:
    """`sharding.check_batch_size` as a user error naming `flag`; returns the per-process batch."""
    try:
        return sharding.check_batch_size(int(batch_size), mesh, flag)
    except ValueError as e:
        devices = mesh.devices.size
        raise UserError(str(e), hint=f"--{flag}=<a multiple of {devices}>") from None


def resolve_data(data_cfg: ml_collections.ConfigDict, splits: Iterable[str]) -> str:
    """The prepared data directory, checked to hold every split of `splits`, none empty.

    `data_dir=None` is the built-in synthetic set: generated and prepared here, once, into
    `synthetic_cache` (later runs reuse it).

    Args:
        data_cfg: `config.data`.
        splits: the splits the run reads (e.g. 'train' and `config.eval.split`).

    Returns:
        The prepared directory (pass it on as `data_cfg.data_dir`).

    Raises:
        UserError: naming the directory and the missing or empty split.
    """
    from dermseg_jax.data import pipeline

    data_dir = pipeline.resolve_data_dir(data_cfg)
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir}: no such directory", hint=PREPARE_HINT)
    if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        raise UserError(
            f"data_dir {data_dir}: not a prepared data set (no dataset_info.json)",
            hint=PREPARE_HINT,
        )
    import tensorflow_datasets as tfds

    prepared = tfds.builder_from_directory(data_dir).info.splits
    for split in splits:
        if split not in prepared:
            raise UserError(
                f"data_dir {data_dir}: no split {split!r} (prepared: {sorted(prepared)})",
                hint="set --config.eval.split or prepare the split",
            )
        if prepared[split].num_examples == 0:
            raise UserError(f"data_dir {data_dir}: split {split!r} holds no examples")
    return data_dir
