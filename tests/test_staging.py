"""Tests of dermseg_jax.data.staging: what `prepare` may replace, and its temporary folders."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dermseg_jax.data import staging
from dermseg_jax.errors import UserError


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def _plant(parent: Path, name: str, owner: dict | None) -> Path:
    folder = parent / name
    (folder / "tfds").mkdir(parents=True)
    (folder / "tfds" / "shard").write_bytes(b"x")
    if owner is not None:
        (folder / staging.OWNER_FILE).write_text(json.dumps(owner))
    return folder


def test_remove_stale_removes_only_folders_of_gone_processes(tmp_path):
    out = tmp_path / "data"
    host = socket.gethostname()
    stale = _plant(tmp_path, ".data.dermseg-prepare-a1", {"pid": _dead_pid(), "host": host})
    kept = [
        _plant(tmp_path, ".data.dermseg-prepare-b2", {"pid": os.getpid(), "host": host}),
        _plant(tmp_path, ".data.dermseg-prepare-c3", {"pid": _dead_pid(), "host": "elsewhere"}),
        _plant(tmp_path, ".data.dermseg-prepare-d4", None),  # no owner file: not recognisable
        _plant(tmp_path, ".data.tmp-e5", {"pid": _dead_pid(), "host": host}),  # not our name
        _plant(tmp_path, ".other.dermseg-prepare-f6", {"pid": _dead_pid(), "host": host}),
    ]
    staging.remove_stale(out)
    assert not stale.exists()
    assert all((folder / "tfds" / "shard").is_file() for folder in kept)


def test_staging_dir_removes_itself_and_the_parents_it_made_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "data"
    with pytest.raises(RuntimeError), staging.staging_dir(out) as work:
        assert json.loads((work / staging.OWNER_FILE).read_text())["pid"] == os.getpid()
        (work / "tfds").mkdir()
        raise RuntimeError("failed build")
    assert list(tmp_path.iterdir()) == []


def test_check_out_refuses_inputs_their_parents_and_foreign_folders(tmp_path):
    raw = tmp_path / "p" / "raw"
    raw.mkdir(parents=True)
    (raw / "image.jpg").write_bytes(b"x")
    inputs = {"--root": raw}
    with pytest.raises(UserError, match="--out is the input --root"):
        staging.check_out(raw, inputs, overwrite=True)
    with pytest.raises(UserError, match="--out holds the input --root"):
        staging.check_out(tmp_path / "p", inputs, overwrite=True)
    foreign = tmp_path / "user"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite refused: not a data set written by prepare"):
        staging.check_out(foreign, inputs, overwrite=True)
    with pytest.raises(UserError, match="already exists and is not empty") as info:
        staging.check_out(foreign, inputs, overwrite=False)
    assert info.value.hint == "--overwrite replaces a data set written by prepare"
    (foreign / staging.SUMMARY_FILE).write_text(json.dumps({"format": "isic2018"}))
    (foreign / "dataset_info.json").write_text("{}")
    staging.check_out(foreign, inputs, overwrite=True)  # recognised as prepared
    assert (foreign / "notes.txt").read_text() == "mine"
