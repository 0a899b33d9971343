"""Tests of the training-run checkpoints in `dermseg_jax.checkpointing` (CheckpointManager part):
keep policy, restore onto shardings, readable errors for damaged checkpoints and failed saves,
the fallback to the newest readable step, and the fit check against a config."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_loading import corrupt

from dermseg_jax import checkpoint_errors, checkpointing, sharding
from dermseg_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step: int) -> dict:
    params = {"w": jnp.full((3,), float(step))}
    return {
        "step": jnp.int32(step),
        "params": params,
        "batch_stats": {"mean": jnp.zeros(2)},
        "opt_state": optax.adam(1e-3).init(params),
        "rng": jax.random.key_data(jax.random.key(step)),
    }


def _save_steps(workdir, scores):
    manager = checkpointing.create_checkpoint_manager(workdir, keep=2, keep_best=1)
    for step, score in scores:
        metrics = None if score is None else {"jaccard/mean": score}
        checkpointing.save_train_state(manager, step, _state(step), metrics=metrics)
    manager.wait_until_finished()
    return manager


def test_keeps_latest_k_and_best(tmp_path):
    scores = [(1, 0.5), (2, 0.9), (3, 0.1), (4, None), (5, 0.2)]
    manager = _save_steps(tmp_path, scores)
    assert manager.all_steps() == [2, 4, 5]
    assert manager.best_step() == 2
    # Saving a step twice is a no-op, not an error (final save after a periodic one).
    assert not checkpointing.save_train_state(manager, 5, _state(5))
    manager.close()


def test_restore_onto_abstract_target_with_shardings(tmp_path):
    manager = _save_steps(tmp_path, [(7, None)])
    replicated = sharding.replicated_sharding(sharding.make_mesh())
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), _state(0)
    )
    restored = checkpointing.restore_train_state(manager, target, 7)
    manager.close()
    assert int(restored["step"]) == 7
    np.testing.assert_array_equal(restored["params"]["w"], np.full(3, 7.0))
    assert restored["params"]["w"].sharding == replicated
    # The optimizer state keeps its optax types, so it plugs back into tx.update.
    assert type(restored["opt_state"]) is type(_state(0)["opt_state"])
    key = jax.random.wrap_key_data(restored["rng"])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(7)))


def test_damaged_step_is_one_line_and_the_newest_readable_is_restored(tmp_path, caplog):
    manager = _save_steps(tmp_path, [(1, None), (2, None)])
    corrupt(tmp_path / "checkpoints" / "2")

    def restore(step):
        return checkpointing.restore_train_state(manager, _state(0), step)

    with pytest.raises(checkpoint_errors.CheckpointDamaged) as info:
        restore(2)
    step_dir = str(tmp_path / "checkpoints" / "2")
    assert str(info.value).startswith(f"{step_dir}: checkpoint step 2 is unreadable (")
    assert len(str(info.value)) < 400 and "tensorstore_spec" not in str(info.value)
    assert info.value.hint == (
        f"pass --checkpoint=N for another step (available: [1]), or remove {step_dir} to use "
        "the one before"
    )
    step, tree = checkpoint_errors.restore_newest_readable([2, 1], restore)
    assert step == 1 and int(tree["step"]) == 1
    assert "Using checkpoint step 1 instead of the damaged step 2" in caplog.text
    with pytest.raises(checkpoint_errors.CheckpointDamaged, match="checkpoint step 2"):
        checkpoint_errors.restore_newest_readable([2], restore)
    manager.close()


def test_a_checkpoint_that_does_not_fit_names_the_array(tmp_path):
    manager = _save_steps(tmp_path, [(1, None)])
    wider = dict(_state(0), params={"w": jnp.zeros(4)})
    with pytest.raises(checkpoint_errors.ConfigMismatch, match=r"params\['w'\] has shape \(3,\)"):
        checkpointing.restore_train_state(manager, wider, 1)
    other_optimizer = dict(_state(0), opt_state=optax.sgd(1e-3).init({"w": jnp.zeros(3)}))
    with pytest.raises(checkpoint_errors.ConfigMismatch, match="opt_state has arrays"):
        checkpointing.restore_train_state(manager, other_optimizer, 1)
    manager.close()


def test_run_config_round_trip(tmp_path):
    config = ml_collections.ConfigDict(
        {
            "model": {"head": "softmax", "width": 0.25, "aspp_rates": (2, 3, 4)},
            "checkpoint": {"best_metric": "jaccard/mean", "best_mode": "max"},
        }
    )
    assert not checkpointing.is_training_workdir(tmp_path)
    checkpointing.save_run_config(tmp_path, config)
    _save_steps(tmp_path, [(1, 0.3)]).close()
    assert checkpointing.is_training_workdir(tmp_path)
    loaded = checkpointing.load_run_config(tmp_path)
    assert loaded.model.width == 0.25 and list(loaded.model.aspp_rates) == [2, 3, 4]


def test_load_run_config_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="config.json: missing"):
        checkpointing.load_run_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        checkpointing.load_run_config(tmp_path)


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_checkpointing import _state
from dermseg_jax import checkpointing
from dermseg_jax.errors import UserError

manager = checkpointing.create_checkpoint_manager({workdir!r})
checkpointing.save_train_state(manager, 1, _state(1))
checkpointing.wait_for_saves(manager)
# A full disk: no file may grow past 100 bytes from now on.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
try:
    checkpointing.save_train_state(manager, 2, _state(2))
    checkpointing.wait_for_saves(manager)
except UserError as e:
    print("USER ERROR", e)
"""


def test_a_failed_save_is_one_line_naming_the_step_and_keeps_the_previous(tmp_path):
    script = FULL_DISK.format(tests=os.path.join(ROOT, "tests"), workdir=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("USER ERROR")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "checkpoint step 2 could not be saved" in lines[0]
    manager = checkpointing.create_checkpoint_manager(tmp_path, read_only=True)
    assert manager.all_steps() == [1]
    manager.close()
