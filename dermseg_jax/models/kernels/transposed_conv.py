"""CPU-tuned transposed convolution: the sub-pixel form with a per-tap kernel gradient.

On XLA:CPU the kernel gradient of `lax.conv_transpose` is a window-dilated convolution that
misses the fast convolution paths (about 25x the forward pass, the largest single cost of the
thesis step). Here the forward pass is one stride-1 convolution per output phase followed by a
depth-to-space interleave (no multiplications by inserted zeros), the input gradient one such
convolution per phase, and the kernel gradient one matrix product per kernel tap.
Same function as `xla.conv_transpose` to float32 rounding; measurements: docs/kernels.md.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from dermseg_jax.models.kernels import xla
from dermseg_jax.models.kernels.conv import after, data_parallel_backward


def _fit(y: jax.Array, output_hw: tuple[int, int]) -> jax.Array:
    """Crops or zero-pads [N, H, W, C] at the bottom/right to `output_hw`."""
    oh, ow = output_hw
    y = y[:, :oh, :ow]
    return jnp.pad(y, ((0, 0), (0, oh - y.shape[1]), (0, ow - y.shape[2]), (0, 0)))


def _subpixel_forward(x: jax.Array, kernel: jax.Array, stride: int, output_hw) -> jax.Array:
    k, _, c_out, _ = kernel.shape
    s = stride
    taps = -(-k // s)  # rows of the largest phase kernel, ceil(k / s)
    # Output row q * s + p sums x[q - j] * kernel[p + s * j] over j: a full correlation of x
    # with phase p's kernel (rows p, p + s, ...; ceil((k - p) / s) of them) flipped along j.
    # One exact convolution per phase: a single convolution over all phases would pad every
    # phase kernel to `taps` rows (64 / 49 of the work at k = 7, s = 2).
    phases = []
    for ph in range(s):
        row = []
        for pw in range(s):
            w = kernel[ph::s, pw::s][::-1, ::-1].transpose(0, 1, 3, 2)  # HWIO
            th, tw = w.shape[:2]
            pad = ((th - 1, taps - 1), (tw - 1, taps - 1))  # all phases: h + taps - 1 rows
            row.append(xla.conv2d(x, w, (1, 1), pad, (1, 1)))
        phases.append(jnp.stack(row, axis=3))  # [N, hq, wq, s (pw), C_out]
    y = jnp.stack(phases, axis=2)  # [N, hq, s (ph), wq, s (pw), C_out]
    n, hq, _, wq = y.shape[:4]
    return _fit(y.reshape(n, hq * s, wq * s, c_out), output_hw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_transpose(x, kernel, stride, output_hw):
    return _subpixel_forward(x, kernel, stride, output_hw)


def conv_transpose(
    x: jax.Array, kernel: jax.Array, stride: int, output_hw: tuple[int, int]
) -> jax.Array:
    """`xla.conv_transpose` (same arguments, same result), computed as described above.

    Args:
        x: [N, H, W, C_in].
        kernel: [k, k, C_out, C_in].
        stride: s.
        output_hw: (H_out, W_out).

    Returns:
        [N, H_out, W_out, C_out].
    """
    return _conv_transpose(x, kernel, int(stride), tuple(int(v) for v in output_hw))


def _fwd(x, kernel, stride, output_hw):
    return _subpixel_forward(x, kernel, stride, output_hw), (x, kernel)


def _bwd(stride, output_hw, residuals, g):
    del output_hw  # g already has the output's shape
    return data_parallel_backward(functools.partial(_local_backward, stride), *residuals, g)


def _local_backward(stride, x, kernel, g):
    n, h, w, _ = x.shape
    k, s = kernel.shape[0], stride
    taps = -(-k // s)
    c_out, c_in = kernel.shape[2:]
    # Output row s * i + t with t = s * j + p is row i + j of phase p (rows p, p + s, ... of
    # the output): y[s * i + t] += x[i] @ kernel[t], so
    #   dx[i] = sum_p sum_j g_p[i + j] @ kernel[p + s * j]^T   and
    #   dkernel[t] = sum_i g[s * i + t]^T x[i].
    g = _fit(g, (s * (h + taps - 1), s * (w + taps - 1)))
    g_phases = g.reshape(n, h + taps - 1, s, w + taps - 1, s, c_out)  # a view of g
    dx = None
    for ph in range(s):
        for pw in range(s):
            # Input gradient, per output phase: a stride-1 VALID correlation of the phase with
            # its taps kernel[ph::s, pw::s], already HWIO for it ([th, tw, C_out, C_in]). Each
            # phase waits for the running sum, so that one phase's result is alive at a time.
            k_p = kernel[ph::s, pw::s]
            th, tw = k_p.shape[:2]
            g_p = g_phases[:, : h + th - 1, ph, : w + tw - 1, pw]
            if dx is not None:
                g_p = after(g_p, dx)
            d = xla.conv2d(g_p, k_p, (1, 1), ((0, 0), (0, 0)), (1, 1))
            dx = d if dx is None else dx + d
    # Kernel gradient, one GEMM per tap, dkernel[t] = G_t @ X: G_t [C_out, N * H * W] is the
    # tap's window of its phase of g, X [N * H * W, C_in] is x. Plain [a, b] @ [b, c] products
    # go to XLA:CPU's GEMM library (a product contracting a leading dimension falls back to
    # generated loops, 4x slower). A scan, not a Python loop, keeps the program small.
    x_rows = x.reshape(n * h * w, c_in)
    ti, tj = (a.ravel() for a in jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing="ij"))

    def tap(carry, t):
        start = (0, t[0] // s, t[0] % s, t[1] // s, t[1] % s, 0)
        window = lax.dynamic_slice(g_phases, start, (n, h, 1, w, 1, c_out))
        dk = jnp.dot(window.reshape(-1, c_out).T, x_rows, preferred_element_type=jnp.float32)
        return carry, dk.astype(kernel.dtype)

    _, dkernel = lax.scan(tap, None, (ti, tj))
    # As in `conv.conv2d`: without the dependence, XLA's memory scheduler defers the kernel
    # gradient and keeps its operands alive through the rest of the backward pass.
    return after(dx, dkernel).astype(x.dtype), dkernel.reshape(kernel.shape)


_conv_transpose.defvjp(_fwd, _bwd)
