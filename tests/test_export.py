"""The GPU/TPU programs, built and checked on this CPU: `jax.export` of the thesis training step
(width 1.0, 128 px, batch 8; float32 and bfloat16) and of the predict function for 'cuda' and
'tpu'. Lowering only (no compilation); one lowering per program, shared by the assertions."""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from dermseg_jax import inference, losses, models, optim, sharding, trainer
from dermseg_jax.configs import thesis, tiny

PLATFORMS = ("cuda", "tpu")
BATCH, SIZE = 8, 128
# Custom calls that GPU and TPU compilers implement (sharding annotations); anything else, a
# CPU library call or a host callback, fails the check.
ALLOWED_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
# Constructs of the CPU kernels that must not reach an accelerator program: a shard_map inside
# a layer and XLA:CPU's reduction barrier.
FORBIDDEN_OPS = ("sdy.manual_computation", "stablehlo.optimization_barrier")


def accelerator_violations(mlir: str) -> list[str]:
    """What in an exported module would not belong in a GPU/TPU program (empty: nothing)."""
    targets = set(re.findall(r"stablehlo\.custom_call @([\w.$\-]+)", mlir))
    targets |= set(re.findall(r"call_target_name\s*=\s*\"([^\"]+)\"", mlir))
    found = [f"custom_call {t}" for t in sorted(targets - ALLOWED_CUSTOM_CALLS)]
    found += [f"callback {t}" for t in sorted(targets) if "callback" in t]
    if "has_side_effect = true" in mlir:
        found.append("a side-effecting custom call (host callback)")
    found += [op for op in FORBIDDEN_OPS if op in mlir]
    return found


def _accelerator_model(config, platforms=PLATFORMS):
    built = [models.create_model(config.model, platform=p) for p in platforms]
    assert all(model == built[0] for model in built), "one program for every platform"
    return built[0]


def _abstract_state(config, model):
    mesh = sharding.make_mesh()
    return jax.eval_shape(
        lambda rng: trainer.create_train_state(config, rng, mesh, model), jax.random.key(0)
    )


def _export_train_step(config, platforms=PLATFORMS, size=SIZE, batch=BATCH):
    model = _accelerator_model(config, platforms)
    step = functools.partial(
        trainer.train_step,
        loss_cfg=config.loss,
        class_weights=jnp.asarray(losses.THESIS_CLASS_WEIGHTS, jnp.float32),
        frozen_groups=optim.frozen_groups(config.optim),
    )
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    pixels = (batch, size, size)
    batch_spec = {
        "image": images,
        "label": jax.ShapeDtypeStruct(pixels, jnp.int32),
        "valid": jax.ShapeDtypeStruct(pixels, jnp.float32),
    }
    state = _abstract_state(config, model)
    exported = jax.export.export(jax.jit(step, donate_argnums=0), platforms=platforms)(
        state, batch_spec
    )
    return model, exported


def _thesis_config(dtype):
    config = thesis.get_config()
    config.model.dtype = dtype
    return config


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def exported_train_step(request):
    return _export_train_step(_thesis_config(request.param))


@pytest.fixture(scope="module")
def exported_predict():
    config = _thesis_config("auto")
    model = _accelerator_model(config)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    )
    predict_fn = inference.create_predict_fn(model, head=config.model.head)
    images = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
    return model, jax.export.export(predict_fn, platforms=PLATFORMS)(variables, images)


def test_train_step_exports_for_gpu_and_tpu_without_cpu_constructs(exported_train_step):
    model, exported = exported_train_step
    assert model.kernels == "xla" and model.width == 1.0
    assert exported.platforms == PLATFORMS
    mlir = exported.mlir_module()
    assert accelerator_violations(mlir) == []
    assert "stablehlo.convolution" in mlir
    # Mixed precision: bfloat16 convolutions, float32 parameters, optimizer state and loss.
    convs_bf16 = "xbf16>" in mlir and "stablehlo.convolution" in mlir
    assert convs_bf16 == (model.dtype == "bfloat16")
    in_dtypes = {a.dtype for a in exported.in_avals if jnp.issubdtype(a.dtype, jnp.floating)}
    assert in_dtypes == {jnp.dtype(jnp.float32)}
    loss = exported.out_avals[-2]  # (state leaves..., grad_norm, loss) in key order
    assert loss.shape == () and loss.dtype == jnp.float32


def test_predict_exports_for_gpu_and_tpu_with_auto_settings(exported_predict):
    model, exported = exported_predict
    # 'auto' means XLA kernels and bfloat16 compute on accelerators.
    assert (model.kernels, model.dtype) == ("xla", "bfloat16")
    assert exported.platforms == PLATFORMS
    assert accelerator_violations(exported.mlir_module()) == []
    assert exported.out_avals[0].shape == (BATCH, SIZE, SIZE, 6)


def test_the_check_catches_cpu_kernels_in_an_accelerator_program():
    config = tiny.get_config()
    config.model.kernels = "cpu_tuned"
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        _, exported = _export_train_step(config, platforms=("cuda",), size=80, batch=2)
    assert "stablehlo.optimization_barrier" in accelerator_violations(exported.mlir_module())
    assert accelerator_violations("stablehlo.custom_call @lapack_sgetrf(%0)") != []
    assert accelerator_violations("stablehlo.custom_call @xla_ffi_python_cpu_callback(%0)")
