"""Pictures of an evaluation: mask overlays, example grid, ROC curves, confusion matrix.

matplotlib runs on the Agg backend (files only, no display). `overlay_masks` is plain numpy/cv2
and is also what `python -m dermseg_jax.predict` writes next to its submission masks.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from dermseg_jax import labels  # noqa: E402

# One colour per structure (RGB), chosen to stay distinct on skin tones and from each other.
STRUCTURE_COLORS = (
    (255, 230, 0),  # milia-like cyst: yellow
    (0, 200, 255),  # negative network: cyan
    (255, 0, 200),  # pigment network: magenta
    (255, 60, 0),  # streaks: red-orange
    (40, 255, 40),  # globules: green
)
_ALPHA = 0.45


def overlay_masks(image: np.ndarray, masks: np.ndarray, *, alpha: float = _ALPHA) -> np.ndarray:
    """Paints structure masks over an image: translucent fill plus a solid outline.

    Args:
        image: uint8 [H, W, 3] RGB image.
        masks: [H, W, 5] structure masks in {0, 1} (overlaps allowed; later structures on top).
        alpha: opacity of the fill.

    Returns:
        uint8 [H, W, 3] RGB image.
    """
    image = np.asarray(image)
    masks = np.asarray(masks)
    if image.shape[:2] != masks.shape[:2]:
        raise ValueError(f"Image {image.shape} and masks {masks.shape} differ in size.")
    out = image.astype(np.float32)
    thickness = max(1, round(max(image.shape[:2]) / 300))
    outlines = []
    for k, color in enumerate(STRUCTURE_COLORS[: masks.shape[-1]]):
        mask = masks[..., k] > 0
        if not mask.any():
            continue
        out[mask] = (1.0 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        outlines.append((contours, color))
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    for contours, color in outlines:
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness)
    return out


def _legend_handles() -> list:
    return [
        Patch(facecolor=np.asarray(c) / 255.0, edgecolor="black", label=name.replace("_", " "))
        for name, c in zip(labels.STRUCTURE_NAMES, STRUCTURE_COLORS, strict=True)
    ]


def plot_examples(
    examples: Sequence[Mapping[str, np.ndarray | str]],
    path: str | pathlib.Path,
    *,
    title: str = "",
) -> None:
    """A grid, one row per image: the image, the truth overlay, the prediction overlay.

    Args:
        examples: dicts with `image` uint8 [H, W, 3], `truth` and `prediction` [H, W, 5] in
            {0, 1}, and `id` (str).
        path: output PNG file.
        title: figure title.
    """
    if not examples:
        return
    rows = len(examples)
    fig, axes = plt.subplots(rows, 3, figsize=(10.5, 3.5 * rows + 0.9), squeeze=False)
    for row, example in zip(axes, examples, strict=True):
        image = np.asarray(example["image"])
        panels = (
            (image, str(example["id"])),
            (overlay_masks(image, example["truth"]), "ground truth"),
            (overlay_masks(image, example["prediction"]), "prediction"),
        )
        for ax, (picture, label) in zip(row, panels, strict=True):
            ax.imshow(picture)
            ax.set_title(label, fontsize=10)
            ax.axis("off")
    fig.legend(
        handles=_legend_handles(),
        loc="lower center",
        ncol=len(labels.STRUCTURE_NAMES),
        fontsize=9,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.35 / (3.5 * rows + 0.9) + 0.02, 1, 0.97 if title else 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | pathlib.Path,
    *,
    title: str = "ROC per structure (pooled pixels)",
) -> None:
    """ROC curves, one line per structure.

    Args:
        curves: name -> (false positive rates [N], true positive rates [N], AUC).
        path: output PNG file.
        title: figure title.
    """
    colors = dict(zip(labels.STRUCTURE_NAMES, STRUCTURE_COLORS, strict=True))
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    for name, (fpr, tpr, auc) in curves.items():
        color = np.asarray(colors.get(name, (0, 0, 0))) / 255.0
        # Yellow and green on white need a darker line to be readable.
        color = 0.8 * color
        ax.plot(fpr, tpr, color=color, linewidth=2, label=f"{name.replace('_', ' ')} ({auc:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9, title="structure (AUC)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(
    matrix: np.ndarray,
    path: str | pathlib.Path,
    *,
    class_names: Sequence[str] = labels.CLASS_NAMES,
    title: str = "Pixel confusion matrix, raw argmax (rows: truth, normalised per row)",
) -> None:
    """The confusion matrix normalised per row (truth), annotated with percentages and counts.

    Args:
        matrix: [C, C] pixel counts, rows = true class, columns = predicted class (the raw
            argmax, `metrics.ThesisMetrics`).
        path: output PNG file.
        class_names: C names.
        title: figure title.
    """
    matrix = np.asarray(matrix, np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    names = [name.replace("_", "\n") for name in class_names]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = normalised[i, j]
            ax.text(
                j,
                i,
                f"{100 * value:.1f}%\n{int(matrix[i, j]):,}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > 0.55 else "black",
            )
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
