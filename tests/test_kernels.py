"""The kernel switch: 'xla' and 'cpu_tuned' compute the same values and gradients, kernel by
kernel (1 device here, 4 emulated in a subprocess) and for the whole thesis network after one
Adam step; 'auto' resolves per platform; 'xla' leaves no custom VJP or shard_map in the model."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dermseg_jax import losses, models, optim, sharding, trainer
from dermseg_jax.configs import thesis, tiny
from dermseg_jax.errors import UserError
from dermseg_jax.models import layers

# Shorter compilations (as tests/test_models.py); both kernel sets compile alike.
jax.config.update("jax_disable_most_optimizations", True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5  # max |xla - cpu_tuned| / max |xla|, float32
XLA, CPU = layers.KERNELS["xla"], layers.KERNELS["cpu_tuned"]

# (kernel, stride, padding, dilation): the network's convolutions (3x3 same, stride-2 VALID,
# 1x1, 5x5) and the ASPP's dilated ones (rates 2, 3, 4).
CONVS = [(3, 1, 1, 1), (3, 2, 0, 1), (1, 1, 0, 1), (5, 1, 2, 1), (3, 1, 2, 2), (3, 1, 3, 3)]
CONVS += [(3, 1, 4, 4)]
# (kernel, input side, output side): the decoder's l5 (k3, output_padding 1), l6 (k7,
# output_padding 0) and l7 (k7, output_padding 1), stride 2, on small maps; and a crop.
DECONVS = [(3, 6, 14), (7, 6, 17), (7, 6, 18), (7, 6, 15)]


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    scale = max(float(np.max(np.abs(want))), 1e-30)
    error = float(np.max(np.abs(got - want))) / scale
    assert error <= RTOL, f"{what}: relative error {error:.2e}"


def _value_and_grads(fn, args, seed):
    """fn(*args), and the gradient of <fn(*args)[0], cotangent> with respect to every arg.

    Only the first output is differentiated: the others are BatchNorm's batch statistics,
    which the network stores as running statistics and never differentiates.
    """
    out = jax.jit(fn)(*args)
    outs = out if isinstance(out, tuple) else (out,)
    # A seed of its own: a cotangent equal to an input's noise makes gradients cancel.
    cot = np.random.default_rng(seed + 1000).normal(size=outs[0].shape)
    cot = jnp.asarray(cot, outs[0].dtype)

    def loss(*a):
        res = fn(*a)
        return jnp.sum((res[0] if isinstance(res, tuple) else res) * cot)

    return outs, jax.jit(jax.grad(loss, range(len(args))))(*args)


def _compare(make_fn, args, what, seed=0):
    xla_out, xla_grads = _value_and_grads(make_fn(XLA), args, seed)
    cpu_out, cpu_grads = _value_and_grads(make_fn(CPU), args, seed)
    for i, (a, b) in enumerate(zip(cpu_out, xla_out, strict=True)):
        _close(a, b, f"{what} output {i}")
    pairs = zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(xla_grads), strict=True)
    for i, (a, b) in enumerate(pairs):
        _close(a, b, f"{what} gradient {i}")


def _put(x, mesh):
    """x, split along `mesh`'s 'data' axis (the trainer's batch), or as is when mesh is None."""
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, sharding.data_sharding(mesh))


def check_conv(case, mesh=None):
    k, stride, pad, dilation = case
    rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
    x = _put(rng.normal(size=(4, 11, 13, 5)).astype(np.float32), mesh)
    w = jnp.asarray(rng.normal(size=(k, k, 5, 7)).astype(np.float32))
    args = ((stride, stride), ((pad, pad), (pad, pad)), (dilation, dilation))
    _compare(lambda ks: lambda x, w: ks.conv2d(x, w, *args), (x, w), f"conv {case}")


def check_deconv(case, mesh=None):
    k, side, out = case
    rng = np.random.default_rng(k + side + out)
    x = _put(rng.normal(size=(4, side, side + 1, 6)).astype(np.float32), mesh)
    w = jnp.asarray(rng.normal(size=(k, k, 3, 6)).astype(np.float32))
    hw = (out, 2 * side + k - 1 + out - (2 * (side - 1) + k))  # same output padding along W
    _compare(lambda ks: lambda x, w: ks.conv_transpose(x, w, 2, hw), (x, w), f"deconv {case}")


def check_batch_norm(relu, mesh=None):
    rng = np.random.default_rng(int(relu))
    # An offset mean and uneven scales, as convolution outputs have; 37 x 41 rows per image
    # take the CPU kernel's grouped sums with a remainder.
    x = 3.0 + 2.0 * rng.normal(size=(4, 37, 41, 5)) * np.array([1.0, 0.1, 5.0, 1.0, 2.0])
    x = _put(x.astype(np.float32), mesh)
    scale = jnp.asarray(1.0 + 0.3 * rng.normal(size=5), jnp.float32)
    bias = jnp.asarray(0.2 * rng.normal(size=5), jnp.float32)
    _compare(lambda ks: lambda x, s, b: ks.batch_norm(x, s, b, 1e-3, relu), (x, scale, bias), "bn")


def check_batch_norm_module(train, mesh=None):
    rng = np.random.default_rng(7)
    x = _put((1.0 + rng.normal(size=(4, 9, 9, 6))).astype(np.float32), mesh)
    variables = layers.BatchNorm(relu=True).init(jax.random.key(0), x, use_running_average=False)
    variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-trivial params and stats

    def make_fn(kernel_set):
        name = "xla" if kernel_set is XLA else "cpu_tuned"
        bn = layers.BatchNorm(momentum=0.9, relu=True, kernels=name)

        def fn(x, params):
            y, updates = bn.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=not train,
                mutable=["batch_stats"],
            )
            return y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]

        return fn

    _compare(make_fn, (x, variables["params"]), f"BatchNorm module train={train}")


def check_all(mesh=None):
    for case in CONVS:
        check_conv(case, mesh)
    for case in DECONVS:
        check_deconv(case, mesh)
    for relu in (False, True):
        check_batch_norm(relu, mesh)
    for train in (True, False):
        check_batch_norm_module(train, mesh)


@pytest.mark.parametrize("case", CONVS)
def test_convolution_parity(case):
    check_conv(case)


@pytest.mark.parametrize("case", DECONVS)
def test_transposed_convolution_parity(case):
    check_deconv(case)


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_parity(relu):
    check_batch_norm(relu)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_module_parity_with_running_statistics(train):
    check_batch_norm_module(train)


def test_parity_on_four_devices_sharded_and_unsharded():
    # 'cpu_tuned' runs its backward passes per shard (shard_map + psum) under the trainer's
    # mesh; under a user's `jax.set_mesh` with an unsharded batch it must take the plain path.
    script = textwrap.dedent(
        """
        import sys, jax
        sys.path.insert(0, "tests")
        import test_kernels
        from dermseg_jax import sharding
        assert jax.device_count() == 4
        mesh = sharding.make_mesh()
        with jax.set_mesh(mesh):
            test_kernels.check_all(mesh)
        with jax.set_mesh(jax.make_mesh((4,), ("data",))):  # Explicit axis, as users write it
            test_kernels.check_all(None)
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_auto_resolves_per_platform_and_bad_names_are_user_errors():
    assert layers.resolve_kernels("auto", "cpu") == "cpu_tuned"
    for platform in ("cuda", "rocm", "gpu", "tpu"):
        assert layers.resolve_kernels("auto", platform) == "xla"
        assert layers.resolve_dtype("auto", platform) == "bfloat16"
    assert layers.resolve_dtype("auto", "cpu") == "float32"
    assert layers.resolve_kernels("xla", "cpu") == "xla"
    assert layers.resolve_kernels("cpu_tuned", "tpu") == "cpu_tuned"
    assert layers.resolve_kernels("auto") == "cpu_tuned"  # tests run on the CPU
    with pytest.raises(UserError, match="model.kernels='fast'"):
        layers.resolve_kernels("fast")
    with pytest.raises(UserError, match="model.dtype='float16'"):
        layers.resolve_dtype("float16", "cpu")
    cfg = tiny.get_config().model
    assert models.create_model(cfg, platform="tpu").kernels == "xla"
    assert models.create_model(cfg, platform="cpu").kernels == "cpu_tuned"


def _jaxpr_text(model, x):
    """The printed jaxpr (nested jaxprs included) of the model's training forward pass."""
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    apply = functools.partial(
        model.apply, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
    )
    return str(jax.make_jaxpr(apply)(variables, x))


def test_xla_kernels_leave_no_custom_vjp_shard_map_or_barrier_in_the_model():
    cfg = tiny.get_config().model
    x = jax.ShapeDtypeStruct((2, 80, 80, 3), jnp.float32)
    special = ("custom_vjp_call", "shard_map", "optimization_barrier")
    xla_text = _jaxpr_text(models.create_model(cfg, platform="cuda"), x)
    cpu_text = _jaxpr_text(models.create_model(cfg, platform="cpu"), x)
    assert not [name for name in special if name in xla_text]
    # The check can fail: the CPU kernels' custom VJPs and barriers are visible to it.
    assert "custom_vjp_call" in cpu_text and "optimization_barrier" in cpu_text


@pytest.fixture(scope="module")
def thesis_step_results():
    """Logits, loss and parameters after one Adam step of the thesis network, per kernel set."""
    config = thesis.get_config()
    mesh = sharding.make_mesh()
    # The thesis network at the smallest size its ASPP rates fit (80 px: l2 is 17x17), to keep
    # the two compilations short; the thesis' own output paddings are in DECONVS.
    batch = sharding.shard_batch(_thesis_batch(2, 80), mesh)
    step = jax.jit(
        functools.partial(
            trainer.train_step,
            loss_cfg=config.loss,
            class_weights=jnp.asarray(losses.THESIS_CLASS_WEIGHTS, jnp.float32),
            frozen_groups=optim.frozen_groups(config.optim),
        )
    )
    results = {}
    with jax.set_mesh(mesh):
        state = trainer.create_train_state(config, jax.random.key(0), mesh)
        for kernels in ("xla", "cpu_tuned"):
            with config.unlocked():
                config.model.kernels = kernels
            model = models.create_model(config.model)
            logits = jax.jit(functools.partial(model.apply, train=False))(
                {"params": state.params, "batch_stats": state.batch_stats}, batch["image"]
            )
            new_state, metrics = step(state.replace(apply_fn=model.apply), batch)
            # The next step's loss is the loss at the parameters after one Adam step.
            _, after = step(new_state, batch)
            results[kernels] = jax.device_get(
                (logits, metrics["loss"], new_state.params, new_state.batch_stats, after["loss"])
            )
    return results


def _thesis_batch(n, size, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 6, (n, size // 8, size // 8))
    return {
        "image": rng.random((n, size, size, 3), np.float32),
        "label": np.repeat(np.repeat(coarse, 8, 1), 8, 2).astype(np.int32),
        "valid": np.ones((n, size, size), np.float32),
    }


def test_thesis_network_logits_loss_and_adam_step_agree(thesis_step_results):
    xla_res, cpu_res = thesis_step_results["xla"], thesis_step_results["cpu_tuned"]
    _close(cpu_res[0], xla_res[0], "logits")
    _close(cpu_res[1], xla_res[1], "loss")
    for a, b in zip(jax.tree.leaves(cpu_res[3]), jax.tree.leaves(xla_res[3]), strict=True):
        _close(a, b, "batch_stats")
    # The loss after the step: the parameters of the noise-level gradients below barely count.
    after = abs(float(cpu_res[4]) - float(xla_res[4])) / abs(float(xla_res[4]))
    assert after <= 1e-4, f"loss after one Adam step: relative difference {after:.2e}"
    # Adam's first step moves a parameter by lr * g / (|g| + eps) (lr 1e-3, eps 1e-8): about
    # +-lr whatever the gradient's size, so a gradient that is rounding noise (a bias before a
    # BatchNorm, whose true gradient is 0) can come out with either sign, up to 2 lr apart.
    # Such gradients are a few per 1000 elements of a large kernel (thesis network at 80 px:
    # 0.44 % of all parameters); all others agree within 1e-6.
    diffs = [
        np.abs(np.asarray(a, np.float64) - b).ravel()
        for a, b in zip(jax.tree.leaves(cpu_res[2]), jax.tree.leaves(xla_res[2]), strict=True)
    ]
    diffs = np.concatenate(diffs)
    assert diffs.max() <= 2.001e-3, diffs.max()
    assert np.mean(diffs > 1e-6) < 1e-2, np.mean(diffs > 1e-6)
