"""Per-layer timing of the thesis network's dominant layers: JAX formulations against PyTorch.

Forward and forward + backward (input and kernel gradients) of the decoder's transposed
convolutions (l5 k3, l6 k7, l7 k7, stride 2), of the 3x3 convolutions at the two largest
resolutions and of training-mode BatchNorm + ReLU on the two largest maps, at the shapes of a
128x128 input, float32, medians of `--steps` runs. JAX variants: the two kernel sets of
`model.kernels` (`dermseg_jax/models/kernels/`: 'cpu_tuned', the sub-pixel transposed
convolution and hand-written backward passes, and 'xla', XLA's own operations differentiated by
JAX), all compiled with the training step's `xla_options`. This is how the CPU formulations
were chosen; `scripts/benchmark.py` times the whole step.

COMMAND:
    .venv/bin/python scripts/benchmark_layers.py --batch 2 --steps 3
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from dermseg_jax import xla_options
from dermseg_jax.models.kernels import batch_norm, conv, transposed_conv, xla

# `model.kernels` -> (conv2d, conv_transpose, batch_norm), all with the same signatures.
KERNEL_SETS = {
    "cpu_tuned": (conv.conv2d, transposed_conv.conv_transpose, batch_norm.batch_norm),
    "xla": (xla.conv2d, xla.conv_transpose, xla.batch_norm),
}

# name: (input side, C_in, C_out, k, output side) at a 128x128 network input.
DECONVS = {"l5": (13, 1056, 800, 3, 28), "l6": (28, 704, 704, 7, 61), "l7": (61, 320, 256, 7, 128)}
# name: (side, C_in, C_out) of 3x3, padding-1 convolutions.
CONVS = {"l6.conv": (61, 704, 256), "l7.conv": (128, 256, 256)}
# name: (side, channels) of BatchNorm + ReLU layers (eps 1e-5).
BATCH_NORMS = {"l6.deconv_bn": (61, 704), "l7.conv_bn": (128, 256)}


def median_seconds(fn, steps: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_pair(layer, x, w, argnums=(0, 1)):
    """(forward, forward + backward) callables of a JAX layer(x, w), blocking.

    Compiled with the training step's XLA options (`xla_options`), as in the training step.
    """
    options = xla_options.train_step_options()
    forward = jax.jit(layer, compiler_options=options)
    grad = jax.jit(
        jax.grad(lambda x, w: jnp.sum(layer(x, w) ** 2), argnums), compiler_options=options
    )
    return (
        lambda: forward(x, w).block_until_ready(),
        lambda: jax.block_until_ready(grad(x, w)),
    )


def torch_pair(module, x):
    x = x.requires_grad_(True)

    def forward():
        with torch.no_grad():
            module(x)

    def backward():
        (module(x) ** 2).sum().backward()

    return forward, backward


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--xla-deconv",
        action="store_true",
        help="also time the 'xla' transposed convolution (on a CPU its backward pass is ~10x "
        "the others: minutes at l7)",
    )
    p.add_argument("--out", default=None, help="optional JSON file")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []

    def record(layer, variant, pair):
        fwd, both = (median_seconds(f, a.steps) for f in pair)
        rows.append({"layer": layer, "variant": variant, "forward_s": fwd, "fwd_bwd_s": both})
        print(f"{layer:8} {variant:22} forward {fwd:7.3f} s   forward+backward {both:7.3f} s")
        sys.stdout.flush()

    for name, (side, c_in, c_out, k, out) in DECONVS.items():
        x = rng.random((a.batch, side, side, c_in), np.float32)
        w = (rng.standard_normal((k, k, c_out, c_in)) * 0.01).astype(np.float32)
        for kernels in ("cpu_tuned", "xla") if a.xla_deconv else ("cpu_tuned",):

            def layer(x, w, deconv=KERNEL_SETS[kernels][1], out=out):
                return deconv(x, w, 2, (out, out))

            record(name, f"jax {kernels}", jax_pair(layer, jnp.asarray(x), jnp.asarray(w)))
        natural = (side - 1) * 2 + k
        module = torch.nn.ConvTranspose2d(c_in, c_out, k, 2, output_padding=out - natural)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
        x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        record(name, "torch ConvTranspose2d", torch_pair(module, x_t))

    for name, (side, c_in, c_out) in CONVS.items():
        x = rng.random((a.batch, side, side, c_in), np.float32)
        w = (rng.standard_normal((3, 3, c_in, c_out)) * 0.01).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        for kernels, (conv2d, _, _) in KERNEL_SETS.items():

            def layer(x, w, conv2d=conv2d):
                return conv2d(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1))

            record(name, f"jax {kernels}", jax_pair(layer, xj, wj))
        module = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        record(
            name,
            "torch Conv2d",
            torch_pair(module, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())),
        )
    for name, (side, channels) in BATCH_NORMS.items():
        x = rng.standard_normal((a.batch, side, side, channels)).astype(np.float32)
        xj, scale = jnp.asarray(x), jnp.ones((channels,), jnp.float32)
        for kernels, (_, _, norm) in KERNEL_SETS.items():

            def layer(x, scale, norm=norm):
                return norm(x, scale, jnp.zeros_like(scale), 1e-5, True)[0]

            record(name, f"jax {kernels}", jax_pair(layer, xj, scale))
        module = torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.ReLU())
        record(
            name,
            "torch BatchNorm2d+ReLU",
            torch_pair(module, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())),
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"batch": a.batch, "steps": a.steps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
