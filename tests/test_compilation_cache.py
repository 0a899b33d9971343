"""Tests of `dermseg_jax.compilation_cache`, each in a fresh process (JAX reads its cache
setting once, at the first compilation)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one small program with the cache set as told and prints what happened.
_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from dermseg_jax import compilation_cache
events = []
jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
arg = None if sys.argv[1] == "<none>" else sys.argv[1]
directory = compilation_cache.enable(arg, min_compile_time_s=0)
y = jax.jit(lambda x: jnp.tanh(x) @ x.T + 3.0)(jnp.ones((8, 8)))
count = lambda name: events.count("/jax/compilation_cache/" + name)
print(json.dumps({"directory": directory, "hits": count("cache_hits"),
                  "misses": count("cache_misses"), "sum": float(y.sum())}))
"""


def _run(directory: str | None, **env) -> dict:
    arg = "<none>" if directory is None else directory
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"} | env
    proc = subprocess.run(
        [sys.executable, "-c", _PROGRAM, arg], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    first = _run(str(cache))
    assert first["directory"] == str(cache)
    assert first["hits"] == 0 and first["misses"] >= 1
    assert any(name.startswith("jit__lambda") for name in os.listdir(cache))
    second = _run(str(cache))
    assert second["hits"] == first["misses"] and second["misses"] == 0
    assert second["sum"] == first["sum"]


def test_empty_directory_turns_the_cache_off(tmp_path):
    out = _run("", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "from_env"))
    assert out["directory"] is None and out["misses"] == 0
    assert not (tmp_path / "from_env").exists()


def test_default_is_jax_setting_else_the_user_cache(tmp_path):
    from_env = tmp_path / "from_env"
    assert _run(None, JAX_COMPILATION_CACHE_DIR=str(from_env))["directory"] == str(from_env)
    assert os.listdir(from_env)
    out = _run(None, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert out["directory"] == str(tmp_path / "xdg" / "dermseg_jax" / "jax")
    assert os.listdir(out["directory"])


def test_a_directory_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(RuntimeError, match=r"compilation cache .*a_file/cache: cannot create it"):
        _run(str(blocker / "cache"))
