"""CLI: segment new images and write ISIC 2018 Task 2 submission masks plus overlays.

COMMAND:
    python -m dermseg_jax.predict --workdir=runs/default --images=photos/ --out=submission/
    python -m dermseg_jax.predict --workdir=models/thesis --images=a.jpg,b.png --out=out/ --tta

For every image (JPEG or PNG; a directory is searched for *.jpg, *.jpeg, *.png) it writes
`OUT/<id>_attribute_<structure>.png` for the five structures: 8-bit single channel, 0/255, at
the image's ORIGINAL size, which is what `isic_challenge_scoring.task2.score` reads; and
`OUT/overlays/<id>_overlay.png`, the image with the predicted structures painted on. `<id>` is
the `ISIC_<7 digits>` in the file name, else the file stem. The network sees the automatic
lesion crop of each image, resized and padded as at evaluation (`pipeline.preprocess_for_inference`);
post-processing is the evaluator's (`inference.full_size_masks`), so the files score exactly as
`python -m dermseg_jax.evaluate` reports at original size. Unreadable images are reported
(file and problem) and skipped; the exit status is 1 if any was skipped.
"""

from __future__ import annotations

import io
import pathlib
import re
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from absl import app, flags, logging
from PIL import Image, UnidentifiedImageError

from dermseg_jax import compilation_cache, evaluate, inference, labels


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the CLI flags (only when run as a program, so importing defines none)."""
    evaluate.define_checkpoint_flags(flag_values)
    flags.DEFINE_list(
        "images",
        None,
        "Image files and/or directories, comma-separated.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string("out", None, "Output directory.", required=True, flag_values=flag_values)
    flags.DEFINE_bool(
        "tta", None, "Flip test-time augmentation (default: the config's).", flag_values=flag_values
    )
    flags.DEFINE_integer("batch_size", 4, "Images per network call.", flag_values=flag_values)
    flags.DEFINE_string(
        "config",
        None,
        "Config file whose data/eval sections to use (default: the run's config.json, or "
        "configs/default.py for a model directory).",
        flag_values=flag_values,
    )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ISIC_ID = re.compile(r"ISIC_\d{7}")


class ImageReadError(ValueError):
    """An input image cannot be read; the message names the file and the problem."""


def image_id(path: str | pathlib.Path) -> str:
    """The ISIC id (`ISIC_<7 digits>`) contained in a file name, else the file stem."""
    path = pathlib.Path(path)
    match = _ISIC_ID.search(path.name)
    return match.group(0) if match else path.stem


def list_images(inputs: Sequence[str]) -> list[pathlib.Path]:
    """Expands files and directories into a sorted list of image files (no duplicates).

    Args:
        inputs: file or directory paths. Directories contribute their *.jpg, *.jpeg and *.png
            files (any letter case, not recursive). Named files are kept whatever their suffix,
            so that a wrong file is reported rather than silently ignored.

    Returns:
        Image paths.

    Raises:
        FileNotFoundError: a named path does not exist.
    """
    paths: list[pathlib.Path] = []
    for item in inputs:
        path = pathlib.Path(item).expanduser()
        if path.is_dir():
            paths.extend(
                sorted(
                    p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        elif path.exists():
            paths.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return list(dict.fromkeys(paths))


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """Decodes an image file to RGB exactly as the prepared data set's pipeline does.

    PIL first decodes the whole file to catch truncated or corrupt files (TensorFlow would fill
    a truncated JPEG with grey); TensorFlow then decodes the pixels that are returned, because
    its JPEG decoder differs from libjpeg's default by a few levels and the network was trained
    and is evaluated on TensorFlow-decoded images. EXIF orientation is ignored, as in ISIC.

    Args:
        path: a JPEG or PNG file.

    Returns:
        uint8 [H, W, 3].

    Raises:
        ImageReadError: missing, unreadable, truncated or not an image.
    """
    import tensorflow as tf

    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a JPEG or PNG image (cannot identify it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{path}: cannot decode image: {e}") from None
    try:
        if mode in ("RGB", "L", "RGBA", "LA", "P"):
            image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        else:
            # CMYK, 16-bit and other modes TensorFlow cannot decode: PIL's conversion.
            with Image.open(io.BytesIO(data)) as im:
                image = np.asarray(im.convert("RGB"))
    except tf.errors.OpError as e:
        raise ImageReadError(f"{path}: cannot decode image: {e.message}") from None
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ImageReadError(f"{path}: unexpected image shape {image.shape}")
    return image


def submission_filename(image_id_: str, structure: str) -> str:
    """ISIC 2018 Task 2 file name of one structure mask."""
    return f"{image_id_}_attribute_{structure}.png"


def write_submission(out_dir: pathlib.Path, image_id_: str, masks: np.ndarray) -> None:
    """Writes the five 0/255 single-channel PNG masks of one image.

    Args:
        out_dir: output directory.
        image_id_: the image's id.
        masks: [H, W, 5] in {0, 1}, `labels.STRUCTURE_NAMES` order.
    """
    for k, name in enumerate(labels.STRUCTURE_NAMES):
        mask = np.where(masks[..., k] > 0, 255, 0).astype(np.uint8)
        Image.fromarray(mask).save(out_dir / submission_filename(image_id_, name))


def _batches(paths: Sequence[pathlib.Path], size: int) -> Iterator[list[pathlib.Path]]:
    for start in range(0, len(paths), size):
        yield list(paths[start : start + size])


def run_predict(
    workdir: str,
    images: Sequence[str],
    out: str,
    *,
    checkpoint: str = "best",
    tta: bool | None = None,
    batch_size: int = 4,
    config_path: str | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Segments images and writes submission masks and overlays.

    Args:
        workdir: training workdir or model directory.
        images: image files and/or directories.
        out: output directory (created).
        checkpoint: 'best', 'latest' or a step (training workdir only).
        tta: flip test-time augmentation; None = the config's `eval.tta`.
        batch_size: images per network call (their full-size decodes are held together).
        config_path: config file for the data/eval sections (see `evaluate.load_run`).
        progress: show a tqdm progress bar.

    Returns:
        {'written': [ids], 'failed': [(file, problem)]}.
    """
    from tqdm import tqdm

    from dermseg_jax import plots
    from dermseg_jax.data import pipeline

    run = evaluate.load_run(workdir, checkpoint=checkpoint, config_path=config_path)
    settings = inference.PostprocessSettings.from_config(run.config, tta=tta)
    predict_fn = inference.create_predict_fn(run.model, head=settings.head, tta=settings.tta)
    out_dir = pathlib.Path(out)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    paths = list_images(images)
    written: list[str] = []
    failed: list[tuple[str, str]] = []
    seen: dict[str, pathlib.Path] = {}
    bar = tqdm(total=len(paths), unit="image", disable=not progress)
    for chunk in _batches(paths, max(1, batch_size)):
        loaded = []
        for path in chunk:
            ident = image_id(path)
            try:
                if ident in seen:
                    raise ImageReadError(f"{path}: same id {ident} as {seen[ident]}")
                image = read_image(path)
                prepared = pipeline.preprocess_for_inference(image, run.config.data)
            except (ImageReadError, ValueError) as e:
                logging.warning("Skipping %s", e)
                print(f"skipped: {e}", file=sys.stderr)
                failed.append((str(path), str(e)))
                bar.update(1)
                continue
            seen[ident] = path
            loaded.append((ident, image, prepared))
        if not loaded:
            continue
        probs = np.asarray(predict_fn(run.variables, np.stack([p["image"] for _, _, p in loaded])))
        for (ident, image, prepared), prob in zip(loaded, probs, strict=True):
            masks = inference.full_size_masks(
                prob,
                prepared["crop_box"],
                prepared["resized_size"],
                image.shape[:2],
                head=settings.head,
                threshold=settings.threshold,
                opening_sizes=settings.opening_sizes,
            )
            write_submission(out_dir, ident, masks)
            Image.fromarray(plots.overlay_masks(image, masks)).save(
                out_dir / "overlays" / f"{ident}_overlay.png"
            )
            written.append(ident)
            bar.update(1)
    bar.close()
    print(
        f"predict: {len(written)} image(s) written to {out_dir}, {len(failed)} skipped"
        + "".join(f"\n  skipped {name}: {problem}" for name, problem in failed)
    )
    return {"written": written, "failed": failed}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    compilation_cache.enable(flags.FLAGS.compilation_cache)
    result = run_predict(
        flags.FLAGS.workdir,
        flags.FLAGS.images,
        flags.FLAGS.out,
        checkpoint=flags.FLAGS.checkpoint,
        tta=flags.FLAGS.tta,
        batch_size=flags.FLAGS.batch_size,
        config_path=flags.FLAGS.config,
    )
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=evaluate.parse_flags)
