"""CLI: `python -m dermseg_jax.train` (flags, logging, multi-process set-up; no training logic).

    python -m dermseg_jax.train                                  # dermseg_jax/configs/default.py
    python -m dermseg_jax.train --config=dermseg_jax/configs/tiny.py --workdir=/tmp/run \
        --config.train.batch_size=8

Without `--workdir` the run goes to `./runs/<timestamp>`; rerunning with the same workdir
resumes from its latest checkpoint. Overrides are locked: a misspelt field is an error.
Multi-process: pass `--coordinator_address`, `--num_processes`, `--process_id` (or
`--distributed` to let JAX detect a cluster); every process runs the same command.
SIGTERM/SIGINT save a checkpoint and exit with 128 + signal number. A user error (config typo,
missing data, a checkpoint that does not fit) is one line on stderr and exit status 2
(`--debug` shows the traceback). The console shows the project's messages, the progress bar and
the results; third-party INFO and warnings go to `WORKDIR/train.log` (`--verbosity=1` shows
them on the console too).
Compiled programs go to JAX's persistent cache (`--compilation_cache`, see
`dermseg_jax.compilation_cache`), so a resumed run does not compile its step again.
"""

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from dermseg_jax import cli, compilation_cache

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default ./runs/<timestamp>); resumes if it has checkpoints."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process training."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection."
)
compilation_cache.define_flag()


def _initialize_distributed() -> None:
    import jax

    if _COORDINATOR.value:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # TensorFlow (input pipeline, TensorBoard) must never claim the accelerators JAX uses.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    _initialize_distributed()
    cache = compilation_cache.enable(flags.FLAGS.compilation_cache)

    import jax

    from dermseg_jax import sharding, train_loop

    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    if jax.process_count() > 1 and not _WORKDIR.value:
        raise app.UsageError("multi-process training needs an explicit shared --workdir")
    workdir = os.path.abspath(
        _WORKDIR.value or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    )
    # Checked before the workdir (and its log file) exists: a failed start leaves nothing.
    train_loop.check_start(_CONFIG.value, workdir, sharding.make_mesh())
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        cli.add_log_file(os.path.join(workdir, "train.log"))
    logging.info(
        "JAX %s: %d process(es), %d device(s) %s; workdir %s; compilation cache %s",
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].platform,
        workdir,
        cache or "off",
    )
    try:
        _, result = train_loop.train_and_evaluate(_CONFIG.value, workdir)
    except train_loop.TrainingInterrupted as e:
        logging.warning("%s", e)
        sys.exit(128 + e.signum)
    summary = {k: v for k, v in result.items() if k == "step" or k.startswith("jaccard/")}
    logging.info("Done: %s", summary)


if __name__ == "__main__":
    cli.run(main)
