"""What a checkpoint problem looks like to the user: one line naming the step and the file, and
how to proceed; and the fallback to the newest readable step.

Orbax and TensorStore report a damaged file in kilobytes of JSON spec (and print more from their
threads); `short_reason` keeps the file and the first clause. A damaged step is a
`CheckpointDamaged` (resume and inference try an older step), a checkpoint whose arrays do not
fit the config a `ConfigMismatch` (no older step fits either), a failed save a `SaveFailed`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from absl import logging

from dermseg_jax.errors import UserError


class CheckpointDamaged(UserError):
    """A checkpoint step that cannot be read (corrupt, truncated or half-written files).

    Args:
        step_dir: the step's directory.
        step: the step.
        others: the run's other steps (for the hint).
        error: what Orbax raised.
    """

    def __init__(self, step_dir: str, step: int, others: Sequence[int], error: BaseException):
        self.step = step
        self.step_dir = step_dir
        choice = (
            f"pass --checkpoint=N for another step (available: {list(others)})"
            if others
            else "no other checkpoint is left"
        )
        super().__init__(
            f"{step_dir}: checkpoint step {step} is unreadable ({short_reason(error)})",
            hint=f"{choice}, or remove {step_dir} to use the one before",
        )


class ConfigMismatch(UserError):
    """A checkpoint whose arrays do not fit the config (another model width, say)."""


class SaveFailed(UserError):
    """A checkpoint step that could not be written (full disk, say); older steps are kept."""

    def __init__(self, step_dir: str, step: int | None, error: BaseException):
        super().__init__(
            f"{step_dir}: checkpoint step {step} could not be saved ({short_reason(error)})",
            hint="free disk space and rerun: it resumes from the newest complete checkpoint",
        )


def short_reason(error: BaseException) -> str:
    """The file and first clause of an Orbax/TensorStore error (they run to kilobytes)."""
    text = str(error).split(" [tensorstore_spec", 1)[0].strip().splitlines()
    reason = text[0] if text else type(error).__name__
    files = re.findall(r'local file "([^"]+)"', reason)
    if files:
        reason = f"{files[-1]}: {reason.rsplit(': ', 1)[-1]}"
    filename = getattr(error, "filename", None)
    if filename and filename not in reason:
        reason = f"{filename}: {reason}"
    return reason if len(reason) <= 300 else reason[:297] + "..."


def restore_newest_readable(steps: Sequence[int], restore: Callable[[int], Any]) -> tuple[int, Any]:
    """`restore(step)` of the first readable of `steps`, warning about each damaged one.

    Args:
        steps: candidate steps, preferred first.
        restore: restores one step; raises `CheckpointDamaged` when it cannot.

    Returns:
        (step, restored).

    Raises:
        CheckpointDamaged: the first step's error, when none of `steps` is readable.
    """
    first_error = None
    for step in steps:
        try:
            restored = restore(step)
        except CheckpointDamaged as e:
            first_error = first_error or e
            logging.warning("%s; trying an older checkpoint", e)
            continue
        if first_error is not None:
            logging.warning(
                "Using checkpoint step %d instead of the damaged step %d (%s)",
                step,
                first_error.step,
                first_error.step_dir,
            )
        return step, restored
    raise first_error


def check_shapes(stored: Mapping[str, Any], abstract: Mapping[str, Any], step_dir: str, step: int):
    """Raises `ConfigMismatch` naming the first array of `abstract` that `stored` lacks or holds
    with another shape: `params`, `batch_stats` path by path, other entries (optimizer state)
    by their multiset of shapes, since Orbax stores optax's tuples as lists."""
    for name, wanted in abstract.items():
        have, need = _shapes(stored.get(name, {})), _shapes(wanted)
        if name in ("params", "batch_stats"):
            for path in sorted(set(have) | set(need)):
                if have.get(path) != need.get(path):
                    raise _mismatch(step_dir, step, f"{name}{path}", have.get(path), need.get(path))
        elif sorted(have.values()) != sorted(need.values()):
            raise _mismatch(step_dir, step, name, len(have), len(need), what="arrays")


def _shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): tuple(getattr(v, "shape", ())) for p, v in leaves}


def _mismatch(step_dir, step, key, have, need, what="shape") -> ConfigMismatch:
    return ConfigMismatch(
        f"{step_dir}: checkpoint step {step} does not fit the config: {key} has {what} "
        f"{have} in the checkpoint, {need} in the config",
        hint="use the run's own config (its config.json) or another --workdir",
    )
