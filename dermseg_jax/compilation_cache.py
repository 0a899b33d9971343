"""JAX's persistent compilation cache: compiled programs saved on disk and reused by later runs.

Why: a resumed or repeated run of the same configuration loads its training step instead of
compiling it, which on a CPU halves the time to the first step and holds less memory (figures:
docs/performance.md). The CLIs (`train`, `evaluate`, `predict`) take `--compilation_cache=DIR`:
empty turns the cache off; without the flag, JAX's own setting (`JAX_COMPILATION_CACHE_DIR`)
or else `DEFAULT_DIR`. The cache must be set before the process compiles anything.
"""

import os

import jax
from absl import flags

DEFAULT_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "dermseg_jax", "jax"
)


def define_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--compilation_cache` (read it with `enable(flag_values.compilation_cache)`)."""
    flags.DEFINE_string(
        "compilation_cache",
        None,
        "Directory of JAX's persistent compilation cache; '' = off (default: "
        f"$JAX_COMPILATION_CACHE_DIR, else {DEFAULT_DIR}).",
        flag_values=flag_values,
    )


def enable(directory: str | None = None, min_compile_time_s: float | None = None) -> str | None:
    """Points JAX's persistent compilation cache at `directory`; returns the directory used.

    Args:
        directory: the cache directory (created when needed; `~` is expanded); '' turns the
            cache off; None keeps JAX's own setting when there is one, else `DEFAULT_DIR`.
        min_compile_time_s: programs that compile faster are not saved (JAX's default: 1 s).

    Returns:
        The absolute cache directory, or None when the cache is off.
    """
    if directory is None:
        directory = jax.config.jax_compilation_cache_dir or DEFAULT_DIR
    if min_compile_time_s is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    if not directory:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"compilation cache {directory}: cannot create it ({e.strerror}); pass another "
            "directory or '' to turn the cache off"
        ) from e
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
