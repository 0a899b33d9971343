"""CPU-tuned 2-D convolution: XLA's convolution whose kernel gradient is computed beside dx.

Left alone, XLA:CPU's memory-optimised scheduler defers every kernel gradient (a small result
needed only by the optimizer) to the end of the backward pass and keeps its activation-sized
inputs alive meanwhile; `after` makes the input gradient wait for it instead (a quarter less
temporary memory in the thesis step). Under a data mesh the backward pass runs per batch shard
with one `psum` per kernel gradient (`data_parallel_backward`). Measurements: docs/kernels.md.
"""

import functools

import jax
from jax import lax

from dermseg_jax.models.kernels import xla
from dermseg_jax.sharding import DATA_AXIS


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: xla.Pairs,
    dilation: tuple[int, int],
) -> jax.Array:
    """`xla.conv2d` (same arguments, same result) with the backward pass described above."""
    return xla.conv2d(x, kernel, strides, padding, dilation)


def _fwd(x, kernel, strides, padding, dilation):
    return xla.conv2d(x, kernel, strides, padding, dilation), (x, kernel)


def after(x: jax.Array, dependency: jax.Array) -> jax.Array:
    """`x`, made to depend on `dependency` so that XLA computes `dependency` first.

    `lax.optimization_barrier` would say this directly, but XLA:CPU drops barriers before it
    schedules. The dependence is `x + 0 * dependency[0]`: exact (XLA does not fold float
    multiplications by zero), except that a non-finite `dependency[0]` makes `x` NaN too.
    """
    first = lax.slice(dependency, (0,) * dependency.ndim, (1,) * dependency.ndim)
    return x + (first.reshape(()) * 0).astype(x.dtype)


def _shards(x: jax.Array) -> int:
    """Number of 'data' shards to run a backward pass on; 1 = no `shard_map`.

    Per-shard only when the batch is known to lie split along 'data': under an `Auto` axis (the
    trainer's mesh) the compiler places it, under an `Explicit` axis its type must say so. A
    batch that is not sharded (a notebook's own loop under `jax.set_mesh`), a 'data' axis that
    is already `Manual` (inside the caller's own `shard_map`) or an uneven split take the plain
    path.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return 1
    shards = mesh.shape[DATA_AXIS]
    axis_type = mesh.axis_types[mesh.axis_names.index(DATA_AXIS)]
    if axis_type == jax.sharding.AxisType.Explicit:
        spec = jax.typeof(x).sharding.spec
        batch_axes = spec[0] if len(spec) else None
        if batch_axes not in (DATA_AXIS, (DATA_AXIS,)):
            return 1
    elif axis_type != jax.sharding.AxisType.Auto:
        return 1
    return shards if x.shape[0] % shards == 0 else 1


def data_parallel_backward(local_backward, x, kernel, g):
    """(dx, dkernel) of a per-example layer, per data shard when the batch is split.

    Args:
        local_backward: (x, kernel, g) -> (dx, dkernel) on any batch.
        x: [N, ...] layer input.
        kernel: the (replicated) kernel.
        g: [N, ...] output gradient.

    Returns:
        (dx, dkernel) of the whole batch: dx keeps x's batch split, dkernel is summed over the
        shards with a single `psum` (no shards: `local_backward`'s own result).
    """
    if _shards(x) == 1:
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
        _, vjp = jax.vjp(lambda x_, k_: xla.conv2d(x_, k_, strides, padding, dilation), x, kernel)
        dx, dk = vjp(g)
        return after(dx, dk), dk

    return data_parallel_backward(local_backward, *residuals, g)


conv2d.defvjp(_fwd, _bwd)
