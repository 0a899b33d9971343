"""The training step's CPU compiler options: accepted by XLA and smaller in memory."""

import jax
import jax.numpy as jnp
import pytest

from configs import thesis
from dermseg_jax import benchmarking, models, sharding, trainer, xla_options


def test_options_are_for_the_cpu_only():
    assert xla_options.train_step_options("cpu") == xla_options.CPU_TRAIN_OPTIONS
    assert xla_options.train_step_options("gpu") == {}
    assert xla_options.train_step_options("tpu") == {}


def test_xla_rejects_what_it_does_not_know_so_the_options_are_real():
    f = jax.jit(lambda x: x * 2, compiler_options={"xla_cpu_scheduler_type": "NO_SUCH_TYPE"})
    with pytest.raises(Exception, match="not a valid enum value"):
        f.lower(jnp.ones(3)).compile()


def test_cpu_options_shrink_the_training_steps_temporary_memory():
    config = thesis.get_config()
    with config.unlocked():
        config.model.width = 0.125
    model = models.create_model(config.model)
    mesh = sharding.make_mesh()
    state = trainer.create_train_state(config, jax.random.key(0), mesh, model)
    batch = sharding.shard_batch(benchmarking.make_batch(2, 96), mesh)

    def temp_bytes(options):
        step = benchmarking.jitted_train_step(config, donate=False, compiler_options=options)
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    default, tuned = temp_bytes({}), temp_bytes(xla_options.train_step_options("cpu"))
    assert tuned < 0.8 * default, (tuned, default)
