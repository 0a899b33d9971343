"""Tests of the training-run checkpoints in `dermseg_jax.checkpointing` (CheckpointManager part)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dermseg_jax import checkpointing, sharding


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
    restored = checkpointing.restore_train_state(manager, target)
    manager.close()
    assert int(restored["step"]) == 7
    np.testing.assert_array_equal(restored["params"]["w"], np.full(3, 7.0))
    assert restored["params"]["w"].sharding == replicated
    # The optimizer state keeps its optax types, so it plugs back into tx.update.
    assert type(restored["opt_state"]) is type(_state(0)["opt_state"])
    key = jax.random.wrap_key_data(restored["rng"])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(7)))


def test_restore_without_checkpoint_names_the_directory(tmp_path):
    manager = checkpointing.create_checkpoint_manager(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoints: no checkpoint"):
        checkpointing.restore_train_state(manager, _state(0))
    manager.close()


def test_run_config_round_trip_and_load_training_variables(tmp_path):
    config = ml_collections.ConfigDict(
        {
            "model": {"head": "softmax", "width": 0.25, "aspp_rates": (2, 3, 4)},
            "checkpoint": {"best_metric": "jaccard/mean", "best_mode": "max"},
        }
    )
    assert not checkpointing.is_training_workdir(tmp_path)
    checkpointing.save_run_config(tmp_path, config)
    _save_steps(tmp_path, [(1, 0.3), (2, 0.8), (3, 0.1)]).close()
    assert checkpointing.is_training_workdir(tmp_path)
    loaded = checkpointing.load_run_config(tmp_path)
    assert loaded.model.width == 0.25 and list(loaded.model.aspp_rates) == [2, 3, 4]
    model_cfg, variables = checkpointing.load_training_variables(tmp_path)
    assert model_cfg.head == "softmax"
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(variables["params"]["w"], np.full(3, 2.0))  # best
    _, latest = checkpointing.load_training_variables(tmp_path, which="latest")
    np.testing.assert_array_equal(latest["params"]["w"], np.full(3, 3.0))


def test_load_run_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpointing.load_run_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        checkpointing.load_run_config(tmp_path)
