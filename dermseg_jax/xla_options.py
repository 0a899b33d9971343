"""XLA compiler options for the training step, per backend (`jax.jit(compiler_options=...)`).

CPU: the memory-optimised scheduler (the default one runs backward-pass work early and keeps its
activation-sized results alive), YNNPACK for matrix products only (XLA's own convolutions and
reductions are faster and fuse), and one LLVM module (less resident memory after compiling).
Together with `models/kernels/conv.after` they cut the thesis step's temporaries from 5097 to
2797 MiB at batch 24; measurements: docs/kernels.md. GPU/TPU: no options.
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
