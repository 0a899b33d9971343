"""Where `prepare` writes: the checks on `--out`, the temporary folder it builds in, the publish.

Nothing the project did not write may be lost: `--out` must not be an input folder or a parent
of one, and `--overwrite` replaces only a data set that prepare wrote (`is_prepared`: its
`prepare_summary.json` names a format and TFDS' `dataset_info.json` is beside it). The data set is
built in a temporary sibling `.<out>.dermseg-prepare-<random>` and renamed into place, so `out`
is either complete or absent. Each temporary folder holds an owner file (process ID and host)
until it is removed, so that a folder left by a killed run is recognisable, and it is removed
by the next run for the same `out` once its process is gone; nothing else is ever removed.
"""

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from absl import logging

from dermseg_jax.data import sources
from dermseg_jax.errors import UserError

SUMMARY_FILE = "prepare_summary.json"
# Written first into each temporary folder and removed last: which process on which host owns it.
OWNER_FILE = "dermseg_prepare_owner.json"


def is_prepared(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a data set written by prepare (its summary and TFDS metadata)."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(summary, dict)
        and summary.get("format") in sources.FORMATS
        and (folder / "dataset_info.json").is_file()
    )


def check_out(out: Path, inputs: Mapping[str, Path], overwrite: bool) -> None:
    """Raises `UserError` unless `out` may become the data set; reads and writes nothing else.

    Args:
        out: the folder to create or (with `overwrite`) replace.
        inputs: the input folders by flag (`--root`, ...): `out` may be neither one nor a parent.
        overwrite: whether a data set that prepare wrote may be replaced.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out is a file, not a folder")
    target = out.resolve()
    for flag, path in inputs.items():
        if target == path.resolve() or target in path.resolve().parents:
            relation = "is" if target == path.resolve() else "holds"
            raise UserError(
                f"{out}: --out {relation} the input {flag} {path}; prepare writes a new folder",
                hint="choose another --out folder",
            )
    replaces(out, overwrite)


def replaces(out: Path, overwrite: bool) -> bool:
    """Whether publishing replaces a data set; raises unless `out` is absent, empty or one."""
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise UserError(
            f"{out}: --out already exists and is not empty",
            hint="--overwrite replaces a data set written by prepare",
        )
    if not is_prepared(out):
        raise UserError(
            f"{out}: --overwrite refused: not a data set written by prepare (no valid "
            f"{SUMMARY_FILE}); nothing was changed",
            hint="choose a new or empty --out folder",
        )
    return True


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """Yields a new temporary folder beside `out`; removes it (and on failure the parents of
    `out` that it created) on exit. Stale temporary folders of `out` are removed first."""
    created = []
    for path in (out.parent, *out.parent.parents):
        if path.exists():
            break
        created.append(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    work = Path(tempfile.mkdtemp(prefix=_prefix(out), dir=out.parent))
    try:
        (work / OWNER_FILE).write_text(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        )
        yield work
        created = []
    finally:
        _remove(work)
        for path in created:  # deepest first; only empty folders go
            with contextlib.suppress(OSError):
                path.rmdir()


def publish(built: Path, out: Path, work: Path, overwrite: bool) -> None:
    """Renames the finished folder `built` to `out`: atomic, and it fails if another writer won.

    A data set being replaced is first moved into `work`, which `staging_dir` removes.
    """
    if replaces(out, overwrite):  # checked again: `out` may have changed meanwhile
        out.rename(work / "replaced")
    try:
        built.rename(out)  # replaces an empty directory, fails on a non-empty one
    except OSError as e:
        raise UserError(f"{out}: --out already exists and is not empty (written meanwhile)") from e


def remove_stale(out: Path) -> None:
    """Removes the temporary folders of `out` whose process, on this host, is gone."""
    for path in out.parent.glob(f"{_prefix(out)}*"):
        try:
            owner = json.loads((path / OWNER_FILE).read_text())
            stale = owner["host"] == socket.gethostname() and not _alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no owner file: not ours, or not recognisable; leave it
        if stale and not path.is_symlink():
            logging.warning("Removing %s, left by an interrupted prepare", path)
            _remove(path)


def _prefix(out: Path) -> str:
    return f".{out.name}.dermseg-prepare-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove(work: Path) -> None:
    """Removes `work`, its owner file last, so that an interrupted removal stays recognisable."""
    for child in work.iterdir():
        if child.name == OWNER_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if [child.name for child in work.iterdir()] in ([OWNER_FILE], []):
        (work / OWNER_FILE).unlink(missing_ok=True)
        work.rmdir()
