"""2-D convolution with a kernel gradient computed as per-tap matrix products.

XLA:CPU computes a convolution's kernel gradient as a "backward filter" convolution whose
window is the (large) output gradient; it misses the fast GEMM paths and was the largest single
cost of the thesis' training step (a 3x3, 256 -> 256 conv at 128x128, batch 2: kernel gradient
2.6 s against 0.4 s for the forward pass; PyTorch's whole forward + backward 1.1 s).

`conv2d` keeps XLA's forward pass and input gradient (both fast) and replaces the kernel
gradient by one matrix product per kernel tap: dW[i, j] = X_ij^T G, where X_ij is the padded
input read at the tap's offset (and the stride) and G the output gradient, both flattened over
(N, H, W). The input is laid out channel-major once ([C_in, N * H * W] rows), so every product
is a plain [C_in, M] @ [M, C_out] GEMM; a `lax.scan` over taps keeps the program small and one
tap's slice alive at a time. Results equal `lax.conv_general_dilated`'s gradient to float32
rounding (tests/test_conv.py).

Under a data-parallel mesh (`jax.set_mesh` with a 'data' axis) the backward pass runs per batch
shard in `jax.shard_map` and the kernel gradient is summed with one `psum` after the tap loop
(`data_parallel_backward`): left to the partitioner, every per-tap product would carry its own
all-reduce inside the loop, and collectives inside loops may run in a different order in
different processes (a gloo "collective mismatch" on multi-process CPU runs).
"""

import functools

import jax
import jax.numpy as jnp
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


def kernel_gradient(x, g, kernel_shape, strides, padding, dilation):
    """dL/dkernel [kh, kw, C_in, C_out] of `conv2d` from its input and output gradient."""
    kh, kw, c_in, c_out = kernel_shape
    (sh, sw), (dh, dw) = strides, dilation
    n, ho, wo, _ = g.shape
    g2 = g.reshape(n * ho * wo, c_out)
    # Channel-major padded input, split into its sh x sw stride phases so that every tap reads
    # one contiguous window: tap (i, j) starts at row i * dh of the padded input, which is row
    # (i * dh) // sh of phase (i * dh) % sh.
    rows = -(-(max((kh - 1) * dh + (ho - 1) * sh + 1, x.shape[1] + sum(padding[0]))) // sh) * sh
    cols = -(-(max((kw - 1) * dw + (wo - 1) * sw + 1, x.shape[2] + sum(padding[1]))) // sw) * sw
    xp = jnp.pad(
        x,
        (
            (0, 0),
            (padding[0][0], rows - x.shape[1] - padding[0][0]),
            (padding[1][0], cols - x.shape[2] - padding[1][0]),
            (0, 0),
        ),
    )
    phases = xp.reshape(n, rows // sh, sh, cols // sw, sw, c_in).transpose(2, 4, 5, 0, 1, 3)
    ti, tj = (a.ravel() for a in jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij"))

    def tap(carry, t):
        oi, oj = t[0] * dh, t[1] * dw
        start = (oi % sh, oj % sw, 0, 0, oi // sh, oj // sw)
        xs = lax.dynamic_slice(phases, start, (1, 1, c_in, n, ho, wo))
        dk = jnp.dot(xs.reshape(c_in, -1), g2, preferred_element_type=jnp.float32)
        return carry, dk.astype(g.dtype)

    _, dk = lax.scan(tap, None, (ti, tj))
    return dk.reshape(kernel_shape)


def after(x: jax.Array, dependency: jax.Array) -> jax.Array:
    """`x`, made to depend on `dependency` so that XLA computes `dependency` first.

    XLA:CPU's memory-optimised scheduler defers a convolution's kernel gradient (a small result
    needed only by the optimizer update) until after the whole backward pass, keeping its two
    activation-sized inputs alive meanwhile: 4.1 instead of 3.1 GiB of temporaries for the
    thesis training step at batch 24 (`xla_options`). Making the input gradient, which the
    next layer needs at once, depend on the kernel gradient schedules both together.
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
        dx, dk = local_backward(x, kernel, g)
        return dx, lax.psum(dk, DATA_AXIS)

    data, replicated = jax.P(DATA_AXIS), jax.P()
    return jax.shard_map(
        shard_backward, in_specs=(data, replicated, data), out_specs=(data, replicated)
    )(x, kernel, g)


def _bwd(strides, padding, dilation, residuals, g):
    def local_backward(x, kernel, g):
        _, input_vjp = jax.vjp(lambda x_: _conv(x_, kernel, strides, padding, dilation), x)
        (dx,) = input_vjp(g)
        dk = kernel_gradient(x, g, kernel.shape, strides, padding, dilation)
        return after(dx, dk), dk.astype(kernel.dtype)

    return data_parallel_backward(local_backward, *residuals, g)


conv2d.defvjp(_fwd, _bwd)
