"""XLA compiler options for the training step, per backend (`jax.jit(compiler_options=...)`).

CPU, three options, for memory and speed (XLA's temporary buffer and compiled program for the
thesis training step at 128x128, float32; `scripts/benchmark.py` reports the resulting peak RSS
against PyTorch's):

- `xla_cpu_scheduler_type`: the default scheduler orders the program for concurrency and
  starts each operation as soon as its inputs exist, so backward-pass work that reads only
  forward values (normalised activations, transposed copies of layer inputs, zero-filled
  accumulators) runs in the forward pass and its activation-sized results wait there for the
  backward pass. The memory-optimised scheduler orders for the smallest live set.
- `xla_cpu_experimental_ynn_fusion_type`: YNNPACK runs the matrix products only. Not the
  reductions: a YNNPACK reduction reads a materialised input, so every BatchNorm sum over an
  elementwise expression (x - mean, g * x_hat) became one more activation-sized buffer; XLA's
  own reduction loops compute the expression on the fly. Not the convolutions either: XLA's
  own (Eigen) convolution is as fast or faster at every shape of the thesis network measured
  (3x3, 256 -> 256 at 128x128: 162 against 110 GFLOP/s; dilated 3x3 at 13x13: 180 against
  130; VALID convolutions ~3x), and the training step at 128 px is 7-10 % faster for it
  (batch 8: 19.1 against 21.2 s, batch 24: 60.7 against 66.9 s, interleaved in one process,
  together with the transposed-convolution backward pass of `models/transposed_conv.py`,
  which computes its input gradient with such convolutions). By default XLA puts every
  convolution and reduction of the step in a YNNPACK fusion (324 fusions in the narrow step of
  tests/test_xla_options.py); with this option none. No matrix product of the thesis step
  qualifies at present (they are 1x1 convolutions written as dots and the transposed
  convolutions' per-tap kernel gradients, which XLA keeps), so products too run on XLA's own.
- `xla_cpu_parallel_codegen_split_count=1`: one LLVM module for the step instead of several
  compiled in parallel: the loaded program holds 123 instead of 249 MiB of RSS after
  compilation, and on 2 cores it compiles faster (14.0 against 18.1 s) (128 px, when the option
  was chosen; today's step at 256 px holds ~210 MiB after compiling with it, ~60 MiB when
  loaded from the persistent compilation cache: `compilation_cache.py`). The peak RSS of a step
  did not move with it (benchmark, batch 2: 2672 against 2675 MiB): the step's own allocations
  reuse the freed memory.

Measured at batch 24 (MiB): default 5097; memory-optimised scheduler 4445; both options 4160;
both options with the kernel-gradient ordering of `models/conv.after` 3155 (batch 2: 752 ->
465). The step is not slower for it: 7.17 -> 6.49 s at batch 2, both programs interleaved in one
process; 87.0 -> 85.2 s at batch 24 in two runs of the benchmark. With convolutions moved from
YNNPACK to XLA's own and the per-phase transposed-convolution input gradient: 3204 MiB at batch
24, 388 at batch 2; with XLA's own convolution kernel gradient in `models/conv.conv2d` (instead
of per-tap products): 2797 at batch 24, 388 at batch 2.

GPU/TPU: no options.
"""

import jax

CPU_TRAIN_OPTIONS = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_parallel_codegen_split_count": 1,
}


def train_step_options(backend: str | None = None) -> dict[str, str | int]:
    """Compiler options for the jitted training step on `backend` (default: JAX's default)."""
    backend = jax.default_backend() if backend is None else backend
    return dict(CPU_TRAIN_OPTIONS) if backend == "cpu" else {}
