"""The CPU compiler options of the training step: real, leaner, convolutions on XLA's own."""

import re

import jax
import jax.numpy as jnp
import pytest

from dermseg_jax import benchmarking, models, sharding, trainer, xla_options
from dermseg_jax.configs import thesis


def test_options_are_for_the_cpu_only():
    assert xla_options.train_step_options("cpu") == xla_options.CPU_TRAIN_OPTIONS
    assert xla_options.train_step_options("gpu") == {}
    assert xla_options.train_step_options("tpu") == {}


def test_xla_rejects_what_it_does_not_know_so_the_options_are_real():
    f = jax.jit(lambda x: x * 2, compiler_options={"xla_cpu_scheduler_type": "NO_SUCH_TYPE"})
    with pytest.raises(Exception, match="not a valid enum value"):
        f.lower(jnp.ones(3)).compile()


@pytest.fixture(scope="module")
def narrow_step_inputs():
    config = thesis.get_config()
    with config.unlocked():
        config.model.width = 0.125
    model = models.create_model(config.model)
    mesh = sharding.make_mesh()
    state = trainer.create_train_state(config, jax.random.key(0), mesh, model)
    batch = sharding.shard_batch(benchmarking.make_batch(2, 96), mesh)
    return config, state, batch


def _compiled_step(inputs, options):
    config, state, batch = inputs
    step = benchmarking.jitted_train_step(config, donate=False, compiler_options=options)
    return step.lower(state, batch).compile()


def test_cpu_options_shrink_the_training_steps_temporary_memory(narrow_step_inputs):
    def temp_bytes(options):
        return _compiled_step(narrow_step_inputs, options).memory_analysis().temp_size_in_bytes

    default, tuned = temp_bytes({}), temp_bytes(xla_options.train_step_options("cpu"))
    assert tuned < 0.8 * default, (tuned, default)


def _ynn_fusion_bodies(hlo: str) -> list[str]:
    """The computations that YNNPACK fusions call, as text (HLO text: one block per computation)."""
    called = set(re.findall(r"kind=kCustom, calls=%([\w.\-]+)", hlo))
    heads = (re.match(r"%([\w.\-]+) ", block) for block in hlo.split("\n\n"))
    return [h.string for h in heads if h and h.group(1) in called]


def test_convolutions_run_on_xla_not_on_ynnpack(narrow_step_inputs):
    hlo = _compiled_step(narrow_step_inputs, xla_options.train_step_options("cpu")).as_text()
    assert not any(" convolution(" in b for b in _ynn_fusion_bodies(hlo))
    assert " convolution(" in hlo
    # The YNNPACK-convolution setting (the CPU setting before XLA's own was chosen).
    options = {
        **xla_options.CPU_TRAIN_OPTIONS,
        "xla_cpu_experimental_ynn_fusion_type": (
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
        ),
    }
    ynn = _ynn_fusion_bodies(_compiled_step(narrow_step_inputs, options).as_text())
    assert any(" convolution(" in b for b in ynn)
