"""Tests of `dermseg_jax.loading`, the one inference loader: step choice, partial restore, shape
checks against the stored config, fallback past a damaged checkpoint, and model directories."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import dermseg_jax
from dermseg_jax import checkpoint_errors, checkpointing, loading, sharding, trainer
from dermseg_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config():
    config = loading.load_config_file(str(ROOT / "dermseg_jax" / "configs" / "tiny.py"))
    config.checkpoint.keep = 5
    return config


def corrupt(step_dir: pathlib.Path) -> None:
    """Empties every data file of a checkpoint step (a truncated copy, a failing disk)."""
    for path in (step_dir / "default").rglob("*"):
        if path.is_file() and (path.parent.name == "d" or path.name == "manifest.ocdbt"):
            path.write_bytes(b"")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    """A training workdir with steps 1, 2, 3 (params + step), step 2 evaluated best."""
    config = _tiny_config()
    root = tmp_path_factory.mktemp("run")
    checkpointing.save_run_config(root, config)
    mesh = sharding.make_mesh()
    with jax.set_mesh(mesh):
        state = trainer.create_train_state(config, jax.random.key(0), mesh)
    manager = checkpointing.create_checkpoint_manager(root, keep=5)
    for step, score in ((1, 0.1), (2, 0.9), (3, None)):
        shifted = state.replace(params=jax.tree.map(lambda p, s=step: p + s, state.params))
        tree = trainer.state_to_checkpoint(shifted)
        metrics = None if score is None else {"jaccard/mean": score}
        checkpointing.save_train_state(manager, step, tree, metrics=metrics)
    manager.wait_until_finished()
    manager.close()
    return root


def _first_param(variables) -> np.ndarray:
    return np.asarray(jax.tree.leaves(variables["params"])[0])


def test_step_choice_best_latest_and_number(workdir):
    best = loading.load_run(workdir)
    latest = loading.load_run(workdir, checkpoint="latest")
    two = loading.load_run(workdir, checkpoint="2")
    assert (best.step, latest.step, two.step) == (2, 3, 2)
    np.testing.assert_allclose(_first_param(latest.variables) - _first_param(best.variables), 1)
    # Inference restores the two collections only, never the optimizer state.
    assert set(best.variables) == {"params", "batch_stats"}
    assert best.config.data.crop_size == _tiny_config().data.crop_size
    with pytest.raises(UserError, match=r"no checkpoint of step 7; available: \[1, 2, 3\]"):
        loading.load_run(workdir, checkpoint=7)
    with pytest.raises(UserError, match="--checkpoint=bset: expected 'best', 'latest'"):
        loading.load_run(workdir, checkpoint="bset")


def test_load_checkpoint_without_evaluated_checkpoints_takes_the_latest(workdir, tmp_path):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    (run / "config.json").write_text((workdir / "config.json").read_text())
    os.symlink(workdir / "checkpoints" / "3", run / "checkpoints" / "3")
    model, variables = dermseg_jax.load_checkpoint(run)
    assert model.width == _tiny_config().model.width
    latest = loading.load_run(workdir, checkpoint="latest")
    np.testing.assert_array_equal(_first_param(variables), _first_param(latest.variables))


def test_shapes_are_checked_against_the_stored_config(workdir, tmp_path):
    run = tmp_path / "run"
    os.makedirs(run)
    os.symlink(workdir / "checkpoints", run / "checkpoints")
    config = json.loads((workdir / "config.json").read_text())
    config["model"]["width"] = 0.125
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint_errors.ConfigMismatch, match=r"checkpoint step 2 does not fit"):
        dermseg_jax.load_checkpoint(run)


def test_a_damaged_checkpoint_falls_back_to_the_newest_readable(workdir, tmp_path, caplog):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    (run / "config.json").write_text((workdir / "config.json").read_text())
    for step in ("1", "2", "3"):
        shutil.copytree(workdir / "checkpoints" / step, run / "checkpoints" / step)
    corrupt(run / "checkpoints" / "3")
    loaded = loading.load_run(run, checkpoint="latest")
    assert loaded.step == 2
    assert "Using checkpoint step 2 instead of the damaged step 3" in caplog.text
    # A step asked for by number never falls back: one line naming the step and its file.
    with pytest.raises(checkpoint_errors.CheckpointDamaged) as info:
        loading.load_run(run, checkpoint=3)
    message = str(info.value)
    assert message.startswith(f"{run / 'checkpoints' / '3'}: checkpoint step 3 is unreadable")
    assert "\n" not in message and str(run / "checkpoints" / "3" / "default") in message
    assert "--checkpoint=N" in info.value.hint and "[1, 2]" in info.value.hint


def test_not_a_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither a training workdir"):
        loading.load_run(tmp_path)


def test_model_directory_uses_default_config_without_the_configs_package(tmp_path, workdir):
    model_dir = tmp_path / "model"
    run = loading.load_run(workdir)
    checkpointing.save_model(model_dir, run.variables, run.config.model)
    code = (
        "import sys; from dermseg_jax import loading\n"
        f"run = loading.load_run({str(model_dir)!r})\n"
        "print(run.step, run.config.data.eval_size, 'configs' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    default = loading.load_config_file(loading.DEFAULT_CONFIG_FILE)
    assert proc.stdout.split() == ["None", str(default.data.eval_size), "False"]


def test_set_overrides_change_inference_settings_and_refuse_unknown_fields():
    from dermseg_jax.configs import default

    config = default.get_config()
    config = type(config)(config.to_dict())  # resolved references, as load_run
    loading.apply_overrides(
        config,
        ["eval.inference=tiles", "eval.tta=True", "eval.threshold=(0.3, 0.4, 0.5, 0.6, 0.7)",
         "data.eval_padding=zeros", "eval.tile_overlap = 0.25"],
    )  # fmt: skip
    assert config.eval.inference == "tiles" and config.eval.tta is True
    assert config.eval.threshold == (0.3, 0.4, 0.5, 0.6, 0.7)  # typed float before: replaced
    assert config.data.eval_padding == "zeros" and config.eval.tile_overlap == 0.25
    for bad in ("eval.infrence=tiles", "model.width=1.0", "eval.tta", "tta=True"):
        with pytest.raises(UserError, match="--set"):
            loading.apply_overrides(config, [bad])
