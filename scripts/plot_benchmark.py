"""Plots training (solid) and inference (dashed) images/s versus batch size, one line per
framework variant and input size, from one or more of `scripts/benchmark.py`'s JSON files
(runs at different batch sizes on the same machine; the first file's machine titles the plot).

COMMAND:
    .venv/bin/python scripts/plot_benchmark.py benchmark_cpu.json [more.json ...] --out plot.png
"""

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(result: dict, out: str) -> None:
    """Writes one PNG: images/s (log) versus batch size, from a (merged) benchmark result."""
    lines = defaultdict(list)
    for r in result["results"]:
        lines[(r["variant"], r["size"], r["mode"])].append((r["batch"], r["images_per_s"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {}
    for (variant, size, mode), points in sorted(lines.items()):
        points.sort()
        color = colors.setdefault((variant, size), f"C{len(colors) % 10}")
        ax.plot(
            [b for b, _ in points],
            [v for _, v in points],
            "-o" if mode == "train" else "--s",
            color=color,
            label=f"{variant} {size}px {mode}",
        )
    m, s = result["machine"], result["settings"]
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in result["results"]})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlim(min(batches) / 1.5, max(batches) * 1.5)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (median)")
    ax.set_title(
        f"width {s['width']}, {m['device']}: {m.get('torch_device') or m['cpu_model']}\n"
        f"jax {m['jax']}, torch {m['torch']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", nargs="+", help="scripts/benchmark.py output(s)")
    p.add_argument("--out", default=None, help="PNG path (default: the first JSON's name, .png)")
    a = p.parse_args()
    results = []
    for path in a.json:
        with open(path) as f:
            results.append(json.load(f))
    merged = dict(results[0], results=[r for res in results for r in res["results"]])
    out = a.out or a.json[0].rsplit(".", 1)[0] + ".png"
    plot(merged, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
