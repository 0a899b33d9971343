"""Where a jitted step spends its time: XLA operations in a `jax.profiler` trace, by kind.

`jax.profiler.trace(dir)` writes a Chrome-trace file (`*.trace.json.gz`) in which XLA:CPU's
thunk executor records one event per executed operation (`ynn_fusion.61`,
`dynamic-slice_bitcast_fusion.18`, ...) on the thread that ran it. `op_seconds` adds up each
event's own time (its duration less that of the events nested in it on the same thread) and
groups operations by kind: the name without its numeric suffix, so the 16 per-tap products of a
transposed convolution's kernel-gradient loop count as one `dot_general` row. Python frames, the
executor's own waits and thread-pool bookkeeping are left out. `scripts/profile_step.py` prints
the table for the thesis training step.

XLA:CPU's own convolutions (Eigen, the training step's setting: `xla_options`) run
asynchronously in Eigen's thread pool; the trace records only their launch
(`conv_general_dilated`, `convolution`, a few microseconds each), so their time is part of the
step's wall time but of no row of the table.
"""

import glob
import gzip
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

# Trace events that are not XLA operations.
_NOT_OPS = ("$", "ThunkExecutor", "SlinkyThreadPool", "np.", "PjitFunction")


def op_kind(name: str) -> str:
    """`ynn_fusion.61` -> `ynn_fusion`: an operation's name without its numeric suffix."""
    return re.sub(r"\.\d+$", "", name)


def op_seconds(events: Iterable[Mapping]) -> dict[str, dict[str, float]]:
    """Own time and count of each kind of XLA operation in Chrome-trace events.

    Args:
        events: trace events; complete events (`ph` 'X') with `name`, `pid`, `tid`, `ts` and
            `dur` in microseconds are read, all others ignored.

    Returns:
        {kind: {'seconds': own time summed, 'count': events}}, largest first.
    """
    threads = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
            threads[(e["pid"], e["tid"])].append(e)
    own = defaultdict(float)
    count = defaultdict(int)
    for thread_events in threads.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, kind, child time] of the enclosing events
        for e in thread_events:
            while stack and stack[-1][0] <= e["ts"]:
                end, kind, children = stack.pop()
                own[kind] -= children
            if stack:
                stack[-1][2] += e["dur"]
            kind = op_kind(e["name"])
            own[kind] += e["dur"]
            count[kind] += 1
            stack.append([e["ts"] + e["dur"], kind, 0.0])
        for _, kind, children in stack:
            own[kind] -= children
    table = {k: {"seconds": own[k] / 1e6, "count": count[k]} for k in own}
    return dict(sorted(table.items(), key=lambda kv: -kv[1]["seconds"]))


def read_trace(trace_dir: str) -> list[dict]:
    """The events of the newest `*.trace.json.gz` under `trace_dir` (what jax.profiler wrote)."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"No *.trace.json.gz under {trace_dir}: was a trace taken there?")
    with gzip.open(max(files, key=os.path.getmtime), "rt") as f:
        return json.load(f)["traceEvents"]
