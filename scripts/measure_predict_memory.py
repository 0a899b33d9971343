"""Peak host memory of `python -m dermseg_jax.predict` with tiled inference on a large image.

COMMAND:
    python scripts/measure_predict_memory.py --out runs/predict_memory
    python scripts/measure_predict_memory.py --height 4000 --width 6000 --shorter 2000

Writes a HEIGHTxWIDTH JPEG (noise on skin colour with a dark lesion), a random narrow
sigmoid-head model directory, then runs predict on it in a child process with
`--set eval.inference=tiles` and the crop resampled to a shorter side of `--shorter` pixels
(the training scale a full-resolution recipe would use), and reports the child's peak RSS
(`getrusage(RUSAGE_CHILDREN).ru_maxrss`) and wall time as JSON (OUT/predict_memory.json).
Issue 17's goal: a 6000x4000 image under 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_image(path: pathlib.Path, height: int, width: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = np.empty((height, width, 3), np.uint8)
    image[...] = (205, 160, 140)
    yy, xx = np.ogrid[:height, :width]
    lesion = ((yy - height / 2) / (0.35 * height)) ** 2 + ((xx - width / 2) / (0.3 * width)) ** 2
    image[lesion < 1] = (120, 80, 60)
    for rows in range(0, height, 500):  # noise band by band: the full float array never exists
        band = image[rows : rows + 500].astype(np.int16)
        band += rng.integers(-12, 13, band.shape, dtype=np.int16)
        image[rows : rows + 500] = np.clip(band, 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path, quality=90)


def write_model(directory: pathlib.Path, crop: int) -> None:
    import jax

    from dermseg_jax import checkpointing, models
    from dermseg_jax.configs import default

    config = default.get_config()
    config.model.update(head="sigmoid", width=0.0625)
    model = models.create_model(config.model)
    x = np.zeros((1, crop, crop, 3), np.float32)
    variables = jax.jit(lambda rng: model.init(rng, x, train=False))(jax.random.key(0))
    checkpointing.save_model(directory, variables, config.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/predict_memory")
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--shorter", type=int, default=2000, help="data.resize_shorter")
    parser.add_argument("--tile", type=int, default=256, help="eval.tile_size")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = out / f"ISIC_0000000_{args.height}x{args.width}.jpg"
    if not image.exists():
        write_image(image, args.height, args.width)
    model_dir = out / "model"
    if not model_dir.exists():
        write_model(model_dir, args.tile)
    cmd = [
        sys.executable, "-m", "dermseg_jax.predict", f"--workdir={model_dir}",
        f"--images={image}", f"--out={out / 'masks'}", "--set=eval.inference=tiles",
        f"--set=eval.tile_size={args.tile}", f"--set=data.resize_shorter={args.shorter}",
        f"--set=data.crop_size={args.tile}", "--batch_size=4",
    ]  # fmt: skip
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        sys.exit(f"predict failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    record = {
        "image": f"{args.height}x{args.width}",
        "resize_shorter": args.shorter,
        "tile_size": args.tile,
        "predict_peak_rss_gib": round(peak / 2**30, 3),
        "predict_wall_s": round(wall, 1),
        "command": " ".join(cmd[1:]),
    }
    (out / "predict_memory.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
