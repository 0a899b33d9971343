"""Profiles one thesis training step (JAX) with `jax.profiler` and prints where its time goes.

The step is `benchmarking.jitted_train_step` (the trainer's step with the thesis loss,
optimizer and frozen groups, compiled with `xla_options`), on a random batch and randomly
initialised weights. One step compiles and warms up; the next is traced into `--trace-dir`
(open it in TensorBoard's profile plugin or Perfetto), and the XLA operations of the trace are
summed by kind (`dermseg_jax.profiling`): own seconds, calls and share of the step's wall time.
On the CPU the worker threads run operations side by side, so the shares can add up to more
than 100 %. XLA's own (Eigen) convolutions are asynchronous and the trace times only their
launch: their time is in the wall time, not in the table (`dermseg_jax/profiling.py`).

COMMAND:
    .venv/bin/python scripts/profile_step.py --size 128 --batch 12
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from dermseg_jax import benchmarking as bm
from dermseg_jax import models, profiling, sharding
from dermseg_jax.configs import thesis


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=float, default=1.0, help="1.0 = the thesis network")
    p.add_argument("--trace-dir", default="/tmp/dermseg_jax_trace")
    p.add_argument("--top", type=int, default=20, help="rows of the table")
    p.add_argument("--out", help="also write the table as JSON here")
    a = p.parse_args()

    config = bm.training_config(thesis.get_config(), a.width)
    image = jnp.zeros((1, a.size, a.size, 3), jnp.float32)
    variables = models.create_model(config.model).init(jax.random.key(0), image, train=False)
    mesh = sharding.make_mesh()
    state = bm.replicated_train_state(config, variables, mesh)
    batch = sharding.shard_batch(bm.make_batch(a.batch, a.size), mesh)
    step = bm.jitted_train_step(config)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    float(metrics["loss"])
    print(f"compile + first step: {time.perf_counter() - start:.1f} s", flush=True)
    with jax.profiler.trace(a.trace_dir):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        float(metrics["loss"])
        wall = time.perf_counter() - start
    table = profiling.op_seconds(profiling.read_trace(a.trace_dir))
    print(f"traced step: {wall:.2f} s ({a.size} px, batch {a.batch}, {jax.devices()[0]})")
    print(f"{'operation kind':40s} {'own s':>8s} {'calls':>6s} {'of step':>8s}")
    for kind, row in list(table.items())[: a.top]:
        share = 100 * row["seconds"] / wall
        print(f"{kind:40s} {row['seconds']:8.3f} {row['count']:6d} {share:7.1f}%")
    print("not timed by the trace: XLA's own convolutions (asynchronous; only their launch)")
    print(f"trace: {a.trace_dir}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"size": a.size, "batch": a.batch, "step_s": wall, "ops": table}, f)


if __name__ == "__main__":
    main()
