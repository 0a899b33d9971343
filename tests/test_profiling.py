"""Operation times from a profiler trace: own time (nested events subtracted), grouped by kind."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from dermseg_jax import profiling


def event(name, ts, dur, tid=1):
    return {"ph": "X", "name": name, "pid": 7, "tid": tid, "ts": ts, "dur": dur}


def test_own_time_subtracts_nested_operations_and_groups_by_kind():
    events = [
        event("while.3", 0, 100),
        event("ynn_fusion.1", 10, 30),
        event("ynn_fusion.2", 50, 20),
        event("dynamic-slice_bitcast_fusion.4", 55, 5),  # inside ynn_fusion.2
        event("ynn_fusion.7", 0, 30, tid=2),  # another thread: not nested in while.3
        event("$python.py:1 step", 0, 500),  # Python frames are not operations
        event("ThunkExecutor::Execute", 0, 100, tid=3),
        {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "worker"}},
    ]
    table = profiling.op_seconds(events)
    assert list(table) == ["ynn_fusion", "while", "dynamic-slice_bitcast_fusion"]
    assert table["ynn_fusion"] == {"seconds": pytest.approx(75e-6), "count": 3}
    assert table["while"] == {"seconds": pytest.approx(50e-6), "count": 1}
    assert table["dynamic-slice_bitcast_fusion"] == {"seconds": pytest.approx(5e-6), "count": 1}


def test_read_trace_takes_the_newest_file_and_names_a_missing_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        profiling.read_trace(str(tmp_path))
    run = tmp_path / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": [event("add.1", 0, 4)]}, f)
    assert profiling.read_trace(str(tmp_path)) == [event("add.1", 0, 4)]


def test_a_real_trace_of_a_jitted_function_has_operation_times(tmp_path):
    f = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1.0)
    a = jnp.ones((256, 256))
    f(a, a).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        f(a, a).block_until_ready()
    table = profiling.op_seconds(profiling.read_trace(str(tmp_path)))
    assert table, "no XLA operation events in the trace"
    assert sum(row["seconds"] for row in table.values()) > 0
