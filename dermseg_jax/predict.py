"""CLI: segment new images and write ISIC 2018 Task 2 submission masks plus overlays.

COMMAND:
    python -m dermseg_jax.predict --workdir=runs/default --images=photos/ --out=submission/
    python -m dermseg_jax.predict --workdir=models/thesis --images=a.jpg,b.png --out=out/ --tta

For every image (JPEG or PNG; a directory is searched for *.jpg, *.jpeg, *.png) it writes
`OUT/<id>_attribute_<structure>.png` for the five structures: 8-bit single channel, 0/255, at
the image's ORIGINAL size, which is what `isic_challenge_scoring.task2.score` reads; and
`OUT/overlays/<id>_overlay.png`, the image with the predicted structures painted on. `<id>` is
the `ISIC_<7 digits>` in the file name, else the file stem. The network sees the automatic
lesion crop of each image, resized and padded as at evaluation
(`eval_pipeline.inference_preprocessor`, traced once for all images); post-processing is the
evaluator's (`inference.full_size_masks`), so the files score exactly as
`python -m dermseg_jax.evaluate` reports at original size.

Nothing is dropped silently. Before the model loads, the inputs are checked: a named path that
does not exist, a directory without images, two files with the same id (`X.jpg`, `X.JPEG`: their
masks would overwrite each other) or an `--out` that is a file stop the command with one line
(exit status 2). An image that cannot be read (corrupt, a broken link, a directory named `*.jpg`)
is reported with its problem and skipped, and the exit status is then 1. 16-bit PNGs are scaled
to 8 bits (the high byte, as TensorFlow decodes them).
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from absl import app, flags
from PIL import Image, UnidentifiedImageError

from dermseg_jax import cli, compilation_cache, inference, loading, submission, tiling
from dermseg_jax.errors import UserError


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the CLI flags (only when run as a program, so importing defines none)."""
    cli.define_checkpoint_flags(flag_values)
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
    flags.DEFINE_integer(
        "batch_size", 4, "Images per network call.", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_multi_string(
        "set",
        [],
        "data.FIELD=VALUE or eval.FIELD=VALUE, repeatable: overrides the run's inference "
        "settings, e.g. --set eval.inference=tiles --set eval.tta=True.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "config",
        None,
        "Config file whose data/eval sections to use (default: the run's config.json, or "
        "dermseg_jax/configs/default.py for a model directory).",
        flag_values=flag_values,
    )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ImageReadError(UserError):
    """An input image cannot be read; the message names the file and the problem."""


def list_images(inputs: Sequence[str]) -> list[pathlib.Path]:
    """Expands files and directories into a sorted list of image files with distinct ids.

    Args:
        inputs: file or directory paths. Directories contribute every entry named *.jpg, *.jpeg
            or *.png (any letter case, not recursive), also a broken link or a folder so named,
            which `read_image` then reports. Named files are kept whatever their suffix, so that
            a wrong file is reported rather than silently ignored.

    Returns:
        Image paths.

    Raises:
        UserError: a named path does not exist, a directory holds no image, or two files have
            the same `submission.image_id`.
    """
    paths: list[pathlib.Path] = []
    for item in inputs:
        path = pathlib.Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(
                    f"{path}: no *.jpg, *.jpeg or *.png file in this directory",
                    hint="check --images",
                )
            paths.extend(found)
        elif path.exists() or path.is_symlink():
            paths.append(path)
        else:
            raise UserError(f"{path}: no such file or directory", hint="check --images")
    paths = list(dict.fromkeys(paths))
    _check_unique_ids(paths)
    return paths


def _check_unique_ids(paths: Sequence[pathlib.Path]) -> None:
    first: dict[str, pathlib.Path] = {}
    for path in paths:
        ident = submission.image_id(path)
        if ident in first:
            raise UserError(
                f"{first[ident]} and {path} have the same image id {ident}: their masks would "
                "overwrite each other",
                hint="rename or remove one of them",
            )
        first[ident] = path


def check_out_dir(out: str | os.PathLike) -> pathlib.Path:
    """The output directory `out` (not created yet).

    Raises:
        UserError: if `out` exists and is not a directory.
    """
    out_dir = pathlib.Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(
            f"--out={out}: exists and is not a directory", hint="pass a directory to --out"
        )
    return out_dir


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """Decodes an image file to RGB exactly as the prepared data set's pipeline does.

    PIL first decodes the whole file to catch truncated or corrupt files (TensorFlow would fill
    a truncated JPEG with grey); TensorFlow then decodes the pixels that are returned, because
    its JPEG decoder differs from libjpeg's default by a few levels and the network was trained
    and is evaluated on TensorFlow-decoded images. TensorFlow reads every PNG bit depth and
    scales 16-bit samples to 8 bits (`>> 8`); PIL converts the JPEG modes it cannot read (CMYK),
    and other formats with more than 8 bits are refused rather than clipped. EXIF orientation is
    ignored, as in ISIC.

    Args:
        path: a JPEG or PNG file.

    Returns:
        uint8 [H, W, 3].

    Raises:
        ImageReadError: missing, a broken link, a directory, unreadable, truncated or not an
            image.
    """
    import tensorflow as tf

    path = pathlib.Path(path)
    if path.is_symlink() and not path.exists():
        raise ImageReadError(f"{path}: broken symbolic link (to {os.readlink(path)})")
    if path.is_dir():
        raise ImageReadError(f"{path}: a directory, not an image file")
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, fmt = im.mode, im.format
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a JPEG or PNG image (cannot identify it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{path}: cannot decode image: {e}") from None
    if fmt != "PNG" and mode.startswith(("I", "F")):
        raise ImageReadError(
            f"{path}: {fmt} image with {mode} pixels (more than 8 bits); only PNG is converted",
            hint="save it as a PNG or an 8-bit JPEG",
        )
    try:
        if fmt == "PNG" or mode in ("RGB", "L"):
            image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        else:
            # CMYK and other 8-bit modes TensorFlow cannot decode: PIL's conversion.
            with Image.open(io.BytesIO(data)) as im:
                image = np.asarray(im.convert("RGB"))
    except tf.errors.OpError as e:
        raise ImageReadError(f"{path}: cannot decode image: {e.message}") from None
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ImageReadError(f"{path}: unexpected image shape {image.shape}")
    return image


def _batches(paths: Sequence[pathlib.Path], size: int) -> Iterator[list[pathlib.Path]]:
    for start in range(0, len(paths), size):
        yield list(paths[start : start + size])


@contextlib.contextmanager
def _tile_bar(image_bar, ident: str, enabled: bool):
    """A second progress bar over one image's tiles (large images take seconds to minutes)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=0, unit="tile", desc=ident, leave=False, position=image_bar.pos + 1)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()


def run_predict(
    workdir: str,
    images: Sequence[str],
    out: str,
    *,
    checkpoint: str = "best",
    tta: bool | None = None,
    batch_size: int = 4,
    config_path: str | None = None,
    overrides: Sequence[str] = (),
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
        config_path: config file for the data/eval sections (see `loading.load_run`).
        overrides: `--set` items ('eval.inference=tiles'), after `config_path`.
        progress: show tqdm progress bars (images; with tiles, also each image's tiles).

    Returns:
        {'written': [ids], 'failed': [(file, problem)]}.

    Raises:
        UserError: bad inputs (see `list_images`, `check_out_dir`) or run, before anything is
            written.
    """
    paths = list_images(images)
    out_dir = check_out_dir(out)
    # Imported once the inputs are known to be usable: bad inputs fail within a second or two.
    from tqdm import tqdm

    from dermseg_jax import plots
    from dermseg_jax.data import eval_pipeline

    run = loading.load_run(
        workdir, checkpoint=checkpoint, config_path=config_path, overrides=overrides
    )
    settings = inference.PostprocessSettings.from_config(run.config, tta=tta)
    predict_fn = inference.create_predict_fn(run.model, head=settings.head, tta=settings.tta)
    preprocess = eval_pipeline.inference_preprocessor(run.config.data)
    tiles = tiling.TileSettings.from_config(run.config.data, run.config.eval)
    tiler = tiles and tiling.TiledPredictor(run.config.data, tiles, batch_size=batch_size)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    failed: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), unit="image", disable=not progress)
    for chunk in _batches(paths, max(1, batch_size)):
        loaded = []
        for path in chunk:
            try:
                image = read_image(path)
            except ImageReadError as e:
                bar.write(f"skipped: {e}", file=sys.stderr)
                failed.append((str(path), str(e)))
                bar.update(1)
                continue
            loaded.append((submission.image_id(path), image, preprocess(image)))
        if not loaded:
            continue
        if tiler is None:
            images = np.stack([p["image"] for _, _, p in loaded])
            probs, gates = tiling.split_prediction(predict_fn(run.variables, images))
        for i, (ident, image, prepared) in enumerate(loaded):
            if tiler is None:
                prob, hw = probs[i], prepared["resized_size"]
                gate = None if gates is None else gates[i]
            else:  # eval.inference='tiles': the crop at the training scale, tile by tile
                with _tile_bar(bar, ident, progress) as tile_progress:
                    prob, gate = tiler.probabilities(
                        lambda x: predict_fn(run.variables, x),
                        image,
                        prepared["crop_box"],
                        progress=tile_progress,
                    )
                hw = prob.shape[:2]
            masks = inference.full_size_masks(
                prob,
                prepared["crop_box"],
                hw,
                image.shape[:2],
                head=settings.head,
                threshold=settings.threshold,
                opening_sizes=settings.opening_sizes,
                presence_probs=gate,
                presence_threshold=settings.presence_threshold,
            )
            submission.write_isic2018_masks(out_dir, ident, masks)
            Image.fromarray(plots.overlay_masks(image, masks)).save(
                out_dir / "overlays" / f"{ident}_overlay.png"
            )
            written.append(ident)
            bar.update(1)
    bar.close()
    print(
        f"predict: {len(written)} image(s) written to {out_dir}, {len(failed)} skipped"
        + "".join(f"\n  skipped {problem}" for _, problem in failed)
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
        overrides=flags.FLAGS.set,
    )
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    cli.run(main, flags_parser=cli.parse_flags)
