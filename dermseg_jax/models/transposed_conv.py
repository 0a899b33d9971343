"""PyTorch-style transposed convolution (padding 0, explicit output size), two formulations.

- 'xla': `lax.conv_transpose(..., transpose_kernel=True)`, the textbook form. On XLA:CPU its
  kernel gradient is a window-dilated convolution that misses the fast (Eigen/oneDNN) paths:
  about 25x slower than the forward pass, the single largest cost of the thesis' training step.
- 'subpixel' (default): the same function, computed faster. Forward: the stride-phase
  (sub-pixel) decomposition, one ordinary stride-1 convolution of the undilated input per
  output phase with exactly that phase's kernel taps, then a depth-to-space interleave; it
  skips the multiplications by the zeros that the dilated form inserts (thesis l7, batch 2:
  0.44 s against 0.72 s for `lax.conv_transpose`). Backward (`jax.custom_vjp`): the input
  gradient as one stride-1 VALID convolution per output phase (the adjoint of the forward's),
  the kernel gradient as k * k plain matrix products, one per kernel tap, over strided windows
  of the output gradient (thesis l7, batch 8: 3.2 s against 3.6 s when the input gradient was
  per-tap products too, which also needed a kernel-sized transposed copy). XLA's own kernel
  gradient of each phase's convolution, as `conv.conv2d` uses, is exact here too but left
  more of XLA's temporaries in the training step (batch 2: 478 against 388 MiB; batch 24:
  2880 against 2797) and was not faster. Agrees with 'xla' to float32 rounding (~1e-6
  relative).

Both take `x` [N, H, W, C_in] and a kernel [k, k, C_out, C_in] (PyTorch's [C_in, C_out, k, k]
transposed by (2, 3, 1, 0)) and return [N, H_out, W_out, C_out] without bias. The natural
output side is (in - 1) * s + k; a larger `output_hw` pads zeros at the bottom/right (PyTorch's
`output_padding`), a smaller one crops there.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from dermseg_jax.models.conv import after, data_parallel_backward

IMPLEMENTATIONS = ("subpixel", "xla")
_DIMS = ("NHWC", "HWIO", "NHWC")


def _natural(size: int, stride: int, k: int) -> int:
    return (size - 1) * stride + k


def _fit(y: jax.Array, output_hw: tuple[int, int]) -> jax.Array:
    """Crops or zero-pads [N, H, W, C] at the bottom/right to `output_hw`."""
    oh, ow = output_hw
    y = y[:, :oh, :ow]
    return jnp.pad(y, ((0, 0), (0, oh - y.shape[1]), (0, ow - y.shape[2]), (0, 0)))


def conv_transpose_xla(
    x: jax.Array, kernel: jax.Array, stride: int, output_hw: tuple[int, int]
) -> jax.Array:
    """Transposed convolution with `lax.conv_transpose` ([N, H, W, I] -> [N, Ho, Wo, O])."""
    k = kernel.shape[0]
    padding = [
        (k - 1, k - 1 + out - _natural(size, stride, k))
        for size, out in zip(x.shape[1:3], output_hw, strict=True)
    ]
    return lax.conv_transpose(
        x, kernel, (stride, stride), padding, dimension_numbers=_DIMS, transpose_kernel=True
    )


def _subpixel_forward(x: jax.Array, kernel: jax.Array, stride: int, output_hw) -> jax.Array:
    k, _, c_out, c_in = kernel.shape
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
            pad = [(th - 1, taps - 1), (tw - 1, taps - 1)]  # all phases: h + taps - 1 rows
            row.append(lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=_DIMS))
        phases.append(jnp.stack(row, axis=3))  # [N, hq, wq, s (pw), C_out]
    y = jnp.stack(phases, axis=2)  # [N, hq, s (ph), wq, s (pw), C_out]
    n, hq, _, wq = y.shape[:4]
    return _fit(y.reshape(n, hq * s, wq * s, c_out), output_hw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_transpose_subpixel(
    x: jax.Array, kernel: jax.Array, stride: int, output_hw: tuple[int, int]
) -> jax.Array:
    """Transposed convolution, sub-pixel forward and per-tap matmul backward.

    Args:
        x: [N, H, W, C_in].
        kernel: [k, k, C_out, C_in].
        stride: s.
        output_hw: (H_out, W_out).

    Returns:
        [N, H_out, W_out, C_out], equal to `conv_transpose_xla` up to rounding.
    """
    return _subpixel_forward(x, kernel, stride, output_hw)


def _subpixel_fwd(x, kernel, stride, output_hw):
    return _subpixel_forward(x, kernel, stride, output_hw), (x, kernel)


def _subpixel_bwd(stride, output_hw, residuals, g):
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
            # its taps kernel[ph::s, pw::s], which is already HWIO for it ([th, tw, C_out,
            # C_in]): an ordinary forward convolution, for XLA:CPU's convolution library. Each
            # phase waits for the running sum, so that one phase's result is alive at a time.
            k_p = kernel[ph::s, pw::s]
            th, tw = k_p.shape[:2]
            g_p = g_phases[:, : h + th - 1, ph, : w + tw - 1, pw]
            if dx is not None:
                g_p = after(g_p, dx)
            d = lax.conv_general_dilated(g_p, k_p, (1, 1), "VALID", dimension_numbers=_DIMS)
            dx = d if dx is None else dx + d
    # Kernel gradient, one GEMM per tap, dkernel[t] = G_t @ X: G_t [C_out, N * H * W] is the
    # tap's window of its phase of g, transposed as it is copied out, and X [N * H * W, C_in]
    # is x. Plain [a, b] @ [b, c] products go to XLA:CPU's GEMM library; a product contracting
    # a leading dimension falls back to generated loops (4x slower here). A scan, not a Python
    # loop, keeps the program small.
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


conv_transpose_subpixel.defvjp(_subpixel_fwd, _subpixel_bwd)


def conv_transpose(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    output_hw: tuple[int, int],
    implementation: str = "subpixel",
) -> jax.Array:
    """PyTorch `ConvTranspose2d(padding=0)` without bias, output sized to `output_hw`.

    Args:
        x: [N, H, W, C_in].
        kernel: [k, k, C_out, C_in].
        stride: s.
        output_hw: (H_out, W_out); beyond the natural (in - 1) * s + k: zeros, below: cropped.
        implementation: 'subpixel' (fast on CPU, default) or 'xla' (`lax.conv_transpose`).

    Returns:
        [N, H_out, W_out, C_out].
    """
    output_hw = tuple(int(v) for v in output_hw)
    if implementation == "subpixel":
        return conv_transpose_subpixel(x, kernel, int(stride), output_hw)
    if implementation == "xla":
        return conv_transpose_xla(x, kernel, int(stride), output_hw)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
