"""Draws a grid of augmented training crops with their structure masks overlaid, to a PNG.

Each cell shows one crop as the network sees it before normalisation (the `--normalization` flag
shows the normalised image instead, e.g. the thesis' wrapped colours), the five structures as
translucent colours (legend below the grid), the lesion outline in white, and padding in grey.

COMMAND:
    .venv/bin/python scripts/show_batch.py --out batch.png
    .venv/bin/python scripts/show_batch.py --out wrap.png --normalization thesis_wrap
"""

import matplotlib
import numpy as np
import torch  # noqa: F401  (torchvision must be imported before TensorFlow)
import torchvision  # noqa: F401
from absl import app, flags

from dermseg_jax import labels
from dermseg_jax.configs import default
from dermseg_jax.data import pipeline

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "batch.png", "Output PNG.")
flags.DEFINE_string("data_dir", None, "Prepared data set (default: the built-in synthetic set).")
flags.DEFINE_integer("num", 16, "Crops to draw.")
flags.DEFINE_integer("seed", 0, "Data seed.")
flags.DEFINE_integer("crop_size", 128, "Training crop size.")
flags.DEFINE_integer("resize_shorter", 256, "Shorter side after the lesion crop.")
flags.DEFINE_string("normalization", "none", "Image shown: 'none' or 'thesis_wrap'.")

# Distinct colours of the five structures, in `labels.STRUCTURE_NAMES` order.
STRUCTURE_COLOURS = np.array(
    [(0.0, 0.9, 1.0), (1.0, 0.2, 0.9), (0.2, 1.0, 0.2), (1.0, 0.9, 0.0), (1.0, 0.3, 0.1)]
)
ALPHA = 0.45


def overlay(image: np.ndarray, structures: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Blends structure colours into an image; padding turns grey.

    Args:
        image: float [h, w, 3] in [0, 1].
        structures: uint8 [h, w, 5].
        valid: float [h, w].

    Returns:
        float [h, w, 3] in [0, 1].
    """
    out = np.clip(image, 0, 1).copy()
    for k, colour in enumerate(STRUCTURE_COLOURS):
        on = structures[..., k] > 0
        out[on] = (1 - ALPHA) * out[on] + ALPHA * colour
    out[valid == 0] = 0.5
    return out


def main(argv):
    del argv
    cfg = default.get_config().data
    cfg.data_dir = FLAGS.data_dir
    cfg.crop_size = FLAGS.crop_size
    cfg.resize_shorter = FLAGS.resize_shorter
    cfg.normalization = FLAGS.normalization
    batch = next(pipeline.create_train_dataset(cfg, batch_size=FLAGS.num, seed=FLAGS.seed))
    cols = int(np.ceil(np.sqrt(FLAGS.num)))
    rows = int(np.ceil(FLAGS.num / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows + 0.8), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= FLAGS.num:
            continue
        ax.imshow(overlay(batch["image"][i], batch["structures"][i], batch["valid"][i]))
        if batch["lesion"][i].any() and not batch["lesion"][i].all():
            ax.contour(batch["lesion"][i], levels=[0.5], colors="white", linewidths=1.0)
        present = [
            labels.STRUCTURE_NAMES[k] for k in np.flatnonzero(batch["structures"][i].any((0, 1)))
        ]
        ax.set_title(", ".join(n.replace("_", " ") for n in present) or "no structure", fontsize=7)
    handles = [
        mpatches.Patch(color=c, label=n.replace("_", " "))
        for n, c in zip(labels.STRUCTURE_NAMES, STRUCTURE_COLOURS, strict=True)
    ]
    handles.append(mpatches.Patch(facecolor="none", edgecolor="white", label="lesion outline"))
    handles.append(mpatches.Patch(color=(0.5, 0.5, 0.5), label="padding"))
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=4,
        fontsize=9,
        frameon=True,
        facecolor=(0.85, 0.85, 0.85),
    )
    fig.suptitle(
        f"training crops {cfg.crop_size}x{cfg.crop_size}, lesion crop '{cfg.lesion_crop}', "
        f"resize '{cfg.resize_method}', normalisation '{cfg.normalization}'",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(FLAGS.out, dpi=110)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
