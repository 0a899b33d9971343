"""The issue-17 ablation: what each step beyond the thesis adds on the ISIC-scale synthetic set.

COMMAND:
    python -m dermseg_jax.data.prepare --format synthetic --profile isic2018 --size 1000x1500 \
        --n 200 --n_val 30 --n_test 40 --seed 0 --shorter_side 0 --out data/isic2018_synthetic
    python scripts/ablation_isic2018.py --data data/isic2018_synthetic --out runs/ablation

Trains the thesis recipe and the `configs/isic2018.py` family at reduced width (no ImageNet
weights: every run starts from scratch) for a fixed number of steps each (chosen to take about
the same CPU time here: `--steps_thesis`, `--steps_isic2018`), then scores the rows of
docs/ablation_isic2018.md on the test split with the official ISIC 2018 scorer
(`python -m dermseg_jax.evaluate --set ...`). Rows after the second are cumulative: a feature
is kept for the later rows when it raises the test split's official (micro) score over the
best row so far, and dropped otherwise (the table says which). Thresholds and presence cut-offs
are fitted on the validation split only.

Every command is printed and kept in OUT/ablation.json with its metrics and wall time; a step
already done (its workdir's last checkpoint, its evaluation JSON) is not repeated, so the
script resumes after an interruption.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
STRUCTURES = ("pigment_network", "negative_network", "milia_like_cyst", "globules", "streaks")


def _common(data: str, steps: int, width: float, batch: int) -> list[str]:
    return [
        f"--config.data.data_dir={data}",
        f"--config.model.width={width}",
        f"--config.train.batch_size={batch}",
        "--config.train.steps_per_epoch=25",  # 200 training images / batch 8
        f"--config.train.num_train_steps={steps}",
        f"--config.eval.every_steps={steps}",
        f"--config.checkpoint.every_steps={steps}",
        "--config.init_from=",  # no ImageNet weights on this machine
    ]


def thesis_flags(args) -> list[str]:
    """The thesis recipe at the ablation's scale."""
    flags = ["--config=dermseg_jax/configs/thesis.py"]
    return flags + _common(args.data, args.steps_thesis, args.width, args.batch)


def isic2018_flags(args, extra: list[str]) -> list[str]:
    """`configs/isic2018.py` at the ablation's scale with `extra` overrides (later win)."""
    flags = ["--config=dermseg_jax/configs/isic2018.py"]
    flags += _common(args.data, args.steps_isic2018, args.width, args.batch)
    # The recipe's issue-17 defaults start off: the rows add them one at a time.
    flags += [
        "--config.model.presence_head=False",
        "--config.eval.inference=resize",
        "--config.eval.tta=False",
        "--config.eval.fit_thresholds=False",
    ]
    return _merge(flags, extra)


def _merge(items: list[str], extra: list[str]) -> list[str]:
    """`items` with those of `extra` replacing any of the same key (the text before '=')."""
    keys = {e.split("=")[0] for e in extra}
    return [i for i in items if i.split("=")[0] not in keys] + list(extra)


def _run(cmd: list[str], log: pathlib.Path) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "a") as f:
        result = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"failed (exit {result.returncode}); see {log}")
    return time.time() - start


def train(name: str, flags: list[str], out: pathlib.Path, steps: int, record: dict) -> str:
    workdir = out / name
    if not (workdir / "checkpoints" / str(steps)).is_dir():
        if workdir.exists():
            shutil.move(workdir, out / f"{name}.interrupted.{int(time.time())}")
        cmd = [sys.executable, "-m", "dermseg_jax.train", *flags, f"--workdir={workdir}"]
        seconds = _run(cmd, out / f"{name}.log")
        record["trainings"][name] = {"command": " ".join(cmd[1:]), "wall_s": round(seconds, 1)}
        (out / "ablation.json").write_text(json.dumps(record, indent=1))
    return str(workdir)


def evaluate(
    workdir: str, step: int, sets: list[str], fit, key: str, out, reuse: str | None = None
) -> dict:
    """{split: {'metrics', 'command', 'wall_s'}} of one row (cached in OUT/evals/<key>.json).

    `fit` True fits thresholds on validation first; with `reuse` (a row key) that row's fitted
    thresholds.json is used as it is (the flip-TTA row: TTA changes the scores little, and a
    refit would read the validation split three times over).
    """
    cache = out / "evals" / f"{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    base = [sys.executable, "-m", "dermseg_jax.evaluate", f"--workdir={workdir}"]
    base += ["--checkpoint=latest", "--num_examples=0"] + [f"--set={s}" for s in sets]
    thresholds = pathlib.Path(workdir) / "thresholds.json"
    if thresholds.exists():  # left by an interrupted row: put aside, never deleted
        thresholds.rename(out / "evals" / f"{key}_stale_thresholds.{int(time.time())}.json")
    if reuse is not None:
        shutil.copy(out / "evals" / f"{reuse}_thresholds.json", thresholds)
    entry = {}
    # The validation split is read only to fit thresholds (rows are compared on test).
    for split in ("validation", "test") if fit else ("test",):
        cmd = [*base, f"--split={split}"]
        if fit and split == "validation":  # fitted here; the test evaluation reads the file
            cmd.append("--fit-thresholds")
        seconds = _run(cmd, out / f"{key}.log")
        result = json.loads((pathlib.Path(workdir) / f"eval_{split}_{step}.json").read_text())
        entry[split] = {
            "metrics": result["metrics"],
            "command": " ".join(cmd[1:]),
            "wall_s": round(seconds, 1),
        }
    if fit or reuse is not None:
        entry["thresholds"] = json.loads(thresholds.read_text())
        thresholds.rename(out / "evals" / f"{key}_thresholds.json")
    cache.write_text(json.dumps(entry, indent=1))
    return entry


def _scores(metrics: dict) -> dict:
    out = {
        "micro": metrics["isic2018/overall"],
        "macro": metrics["isic2018/macro"],
    }
    for s in STRUCTURES:
        out[s] = metrics[f"isic2018/jaccard/{s}"]
    return out


def markdown_table(record: dict, split: str = "test") -> str:
    """The rows of OUT/ablation.json as a markdown table of one split's official scores."""
    names = {
        "pigment_network": "pig. network",
        "negative_network": "neg. network",
        "milia_like_cyst": "cysts",
        "globules": "globules",
        "streaks": "streaks",
    }
    head = ["row", "micro (official)", "macro", *names.values(), "kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in record["rows"]:
        if split not in row:
            continue
        scores = row[split]
        kept = {True: "yes", False: "no", None: ""}[row.get("adopted")]
        cells = [row["row"], *(f"{scores[k]:.3f}" for k in ("micro", "macro", *names)), kept]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared ISIC-scale synthetic set")
    parser.add_argument("--out", required=True, help="folder for the runs and ablation.json")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps_thesis", type=int, default=1000)
    parser.add_argument("--steps_isic2018", type=int, default=160)
    parser.add_argument(
        "--table", action="store_true", help="only print OUT/ablation.json's tables"
    )
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    if args.table:
        record = json.loads((out / "ablation.json").read_text())
        for split in ("test", "validation"):
            print(f"{split}:\n{markdown_table(record, split)}\n")
        return
    (out / "evals").mkdir(parents=True, exist_ok=True)
    record = {"trainings": {}, "rows": [], "args": vars(args)}
    if (out / "ablation.json").exists():  # a resumed run keeps the training commands
        record["trainings"] = json.loads((out / "ablation.json").read_text())["trainings"]

    keys = {}

    def row(label: str, run: str, flags: list[str], steps: int, sets: list[str], fit, reuse=None):
        workdir = train(run, flags, out, steps, record)
        key = label.replace(" ", "_").replace("/", "_").replace("+", "plus").replace(".", "")
        keys[label] = key
        result = evaluate(workdir, steps, sets, fit, key, out, reuse)
        entry = {"row": label, "run": run, "set": sets, "fit": fit, "thresholds_of": reuse}
        for split in ("validation", "test"):
            if split in result:
                entry[split] = _scores(result[split]["metrics"])
                entry[f"{split}_command"] = result[split]["command"]
        entry["thresholds"] = result.get("thresholds")
        record["rows"].append(entry)
        (out / "ablation.json").write_text(json.dumps(record, indent=1))
        print(f"{label}: test {entry['test']}", flush=True)
        return entry["test"]["micro"]

    row("thesis recipe", "thesis", thesis_flags(args), args.steps_thesis, [], False)
    # The recipe as it was before issue 17: encoder learning rates for ImageNet weights (here
    # a random encoder), zero padding at evaluation, one resized pass, threshold 0.5.
    best_train = ["--config.optim.encoder_lr_without_init=0"]
    best_run, best_sets, best_fit = "isic2018_before", ["data.eval_padding=zeros"], False
    best_key = None
    best = row(
        "configs/isic2018.py as before",
        best_run,
        isic2018_flags(args, best_train),
        args.steps_isic2018,
        best_sets,
        best_fit,
    )
    # (label, training run name and its override or None, eval settings, fit or None).
    candidates = [
        (
            "+ random encoder at lr 1e-3",
            ("isic2018_encoder_lr", "--config.optim.encoder_lr_without_init=1e-3"),
            [],
            None,
        ),
        ("+ padding fix", None, ["data.eval_padding=edge"], None),
        ("+ tiled inference", None, ["eval.inference=tiles"], None),
        ("+ metric-aware loss", ("isic2018_log_jaccard", "--config.loss.name=bce_log_jaccard"),
         [], None),
        ("+ fitted thresholds", None, [], True),
        ("+ presence gate", ("isic2018_gate", "--config.model.presence_head=True"), [], True),
        ("+ flip TTA", None, ["eval.tta=True"], "reuse"),
    ]  # fmt: skip
    for label, training, extra, fit in candidates:
        run, train_flags = best_run, best_train
        if training is not None:
            run, train_flags = training[0], _merge(best_train, [training[1]])
        sets = _merge(best_sets, extra)
        reuse = None
        if fit == "reuse":  # the best row's fitted thresholds, if it fitted any
            fit, reuse = False, (best_key if best_fit else None)
        fit = best_fit if fit is None else fit
        flags = isic2018_flags(args, train_flags)
        score = row(label, run, flags, args.steps_isic2018, sets, fit, reuse)
        adopted = score > best
        record["rows"][-1]["adopted"] = adopted
        if adopted:
            best, best_run, best_train, best_sets = score, run, train_flags, sets
            best_fit, best_key = fit or reuse is not None, keys[label]
    record["final"] = {
        "run": best_run,
        "train": best_train,
        "set": best_sets,
        "fit": best_fit,
        "test_micro": best,
    }
    (out / "ablation.json").write_text(json.dumps(record, indent=1))
    print(markdown_table(record))
    print(json.dumps(record["final"]))


if __name__ == "__main__":
    main()
