"""2-D convolution whose backward pass computes the kernel gradient together with dx.

`conv2d` is `lax.conv_general_dilated` (XLA's forward pass, input gradient and kernel
gradient) with one change to the backward pass: the input gradient, which the layer below
needs at once, is made to depend on the kernel gradient (`after`). Left alone, XLA:CPU's
memory-optimised scheduler defers the kernel gradients (small results needed only by the
optimizer update) until after the whole backward pass and keeps their activation-sized
inputs alive meanwhile: XLA's temporaries for the thesis training step at 128x128, batch 24,
are 3786 MiB with plain `lax.conv_general_dilated` and 2797 MiB with `conv2d` (batch 2: 457
against 388; `jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes`).

Until XLA:CPU's own (Eigen) convolutions replaced YNNPACK's in `xla_options`, the kernel
gradient here was one matrix product per kernel tap, because XLA's backward-filter convolution
was then the largest single cost of the step. XLA's kernel gradient is now as fast (training
step at batch 8: 21.4 against 21.6 s, interleaved in one process), needs less memory (batch
24: 2797 against 3205 MiB of temporaries) and is what the GPU's cuDNN runs best.

Under a data-parallel mesh (`jax.set_mesh` with a 'data' axis) the backward pass runs per batch
shard in `jax.shard_map` and the kernel gradient is summed with one `psum`
(`data_parallel_backward`): the input gradient then waits for the shard's own kernel gradient
only, not for the all-reduce, which stays free to overlap with the rest of the backward pass.
"""

import functools

import jax
from jax import lax

from dermseg_jax.sharding import DATA_AXIS

_DIMS = ("NHWC", "HWIO", "NHWC")

Pairs = tuple[tuple[int, int], tuple[int, int]]


def _conv(x, kernel, strides, padding, dilation):
    return lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=_DIMS
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: Pairs,
    dilation: tuple[int, int],
) -> jax.Array:
    """Cross-correlation of NHWC `x` with an HWIO `kernel` (what `nn.Conv` computes).

    Args:
        x: [N, H, W, C_in].
        kernel: [kh, kw, C_in, C_out].
        strides: (sh, sw).
        padding: ((top, bottom), (left, right)) zeros.
        dilation: kernel dilation (dh, dw).

    Returns:
        [N, H_out, W_out, C_out].
    """
    return _conv(x, kernel, strides, padding, dilation)


def _fwd(x, kernel, strides, padding, dilation):
    return _conv(x, kernel, strides, padding, dilation), (x, kernel)


def after(x: jax.Array, dependency: jax.Array) -> jax.Array:
    """`x`, made to depend on `dependency` so that XLA computes `dependency` first.

    XLA:CPU's memory-optimised scheduler defers a convolution's kernel gradient (a small result
    needed only by the optimizer update) until after the whole backward pass, keeping its two
    activation-sized inputs alive meanwhile (module docstring). Making the input gradient,
    which the next layer needs at once, depend on the kernel gradient schedules both together.
    `lax.optimization_barrier` would say this directly, but XLA:CPU drops barriers before it
    schedules. The dependence is `x + 0 * dependency[0]`: exact (XLA does not fold float
    multiplications by zero), except that a non-finite `dependency[0]` makes `x` NaN too.
    """
    first = lax.slice(dependency, (0,) * dependency.ndim, (1,) * dependency.ndim)
    return x + (first.reshape(()) * 0).astype(x.dtype)


def data_parallel_backward(local_backward, x, kernel, g):
    """(dx, dkernel) of a per-example layer, per data shard when a 'data' mesh is set.

    Args:
        local_backward: (x, kernel, g) -> (dx, dkernel) on any batch.
        x: [N, ...] layer input, batch-sharded under data parallelism.
        kernel: the (replicated) kernel.
        g: [N, ...] output gradient.

    Returns:
        (dx, dkernel) of the whole batch: dx stays batch-sharded, dkernel is summed over the
        shards with a single `psum`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return local_backward(x, kernel, g)
    shards = mesh.shape[DATA_AXIS]
    if shards == 1 or x.shape[0] % shards:
        return local_backward(x, kernel, g)

    def shard_backward(x, kernel, g):
        # The kernel is the same on every shard; marked as varying, its gradient here is this
        # shard's own. Otherwise the transpose of the implicit broadcast inside
        # `local_backward`'s autodiff would already sum it over the shards, and the psum below
        # would count it once per shard.
        kernel = lax.pcast(kernel, DATA_AXIS, to="varying")
        dx, dk = local_backward(x, kernel, g)
        return dx, lax.psum(dk, DATA_AXIS)

    data, replicated = jax.P(DATA_AXIS), jax.P()
    return jax.shard_map(
        shard_backward, in_specs=(data, replicated, data), out_specs=(data, replicated)
    )(x, kernel, g)


def _bwd(strides, padding, dilation, residuals, g):
    def local_backward(x, kernel, g):
        _, vjp = jax.vjp(lambda x_, k_: _conv(x_, k_, strides, padding, dilation), x, kernel)
        dx, dk = vjp(g)
        return after(dx, dk), dk

    return data_parallel_backward(local_backward, *residuals, g)


conv2d.defvjp(_fwd, _bwd)
