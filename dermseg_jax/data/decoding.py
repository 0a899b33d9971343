"""Decoding and validation of single raw files: JPEG/PNG images, 0/255 PNG masks, thesis .mat.

Each function raises `DataError` naming the file and the problem. cv2 decodes damaged files
without an error, so they are checked first: truncated JPEGs (grey bottom rows) by the
end-of-image marker after the last scan, truncated PNGs by walking their chunks to IEND, and JPEGs
with corrupt entropy-coded data (libjpeg only warns "Corrupt JPEG data" on stderr) by a strict
simplejpeg decode at 1/8 scale, which reads every Huffman code and raises on libjpeg's warnings.
Bytes after a PNG's IEND chunk are accepted: no decoder reads them and the image is complete.
Images must be RGB: PIL reads the mode from the header without decoding, since cv2's IMREAD_COLOR
would silently convert grey-scale and drop alpha. Palette masks are read through their palette.
Large images are decoded with JPEG DCT scaling (`cv2.IMREAD_REDUCED_COLOR_2/4/8`) and resized
to `shorter_side` (INTER_AREA for images, nearest for masks).
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import scipy.io
import simplejpeg
from PIL import Image, UnidentifiedImageError

from dermseg_jax.errors import UserError

if TYPE_CHECKING:
    from dermseg_jax.data.sources import ExampleRef

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MODE_NAMES = {
    "L": "grey-scale",
    "LA": "grey-scale with alpha",
    "RGBA": "RGBA",
    "P": "palette",
    "CMYK": "CMYK",
    "1": "1-bit",
    "I;16": "16-bit grey-scale",
    "I": "32-bit integer",
    "F": "32-bit float",
}


class DataError(UserError):
    """A raw data file is missing, unreadable or inconsistent; the message names the file."""


def _read_bytes(path: Path, what: str, ref: ExampleRef) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            target = os.readlink(path)
            raise DataError(f"{path}: {what} is a broken symbolic link (to {target})") from None
        raise DataError(f"{path}: {what} not found for {ref.id} (listed in {ref.origin})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: {what} is a folder, not a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what}: {e.strerror or e}") from None


def _png_end(data: bytes) -> int | None:
    """The offset just past the IEND chunk, or None if the chunks stop before it (truncated)."""
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        offset += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return offset if offset <= len(data) else None
    return None


def _check_complete(data: bytes, path: Path, what: str) -> None:
    """Catches truncated files, which cv2 decodes silently (grey bottom rows)."""
    if data[:3] == b"\xff\xd8\xff":
        # The end-of-image marker must follow the last start-of-scan: neither can occur inside
        # entropy-coded data, so this holds for baseline and progressive files alike.
        last_scan = data.rfind(b"\xff\xda")
        if last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0:
            raise DataError(f"{path}: truncated JPEG {what}: no end-of-image marker (FFD9)")
    elif data[:8] == _PNG_SIGNATURE:
        if _png_end(data) is None:
            raise DataError(f"{path}: truncated PNG {what}: the chunks end before IEND")
    else:
        raise DataError(f"{path}: corrupt {what}: not a JPEG or PNG file (starts {data[:8]!r})")


def _check_jpeg_data(data: bytes, path: Path, what: str) -> None:
    """Catches corrupt entropy-coded data, which cv2 decodes with only a warning on stderr."""
    try:
        # strict=True turns libjpeg's warnings ("Corrupt JPEG data: ...", "premature end of data
        # segment") into errors; the 1/8-scale decode still reads every Huffman code.
        simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)
    except ValueError as e:
        raise DataError(f"{path}: corrupt JPEG {what}: {e}") from None


def _image_header(data: bytes, path: Path, what: str) -> tuple[str, int, int]:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.mode, im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: corrupt {what}: {e}") from None


def _target_size(height: int, width: int, shorter_side: int | None) -> tuple[int, int]:
    short = min(height, width)
    if shorter_side is None or short <= shorter_side:
        return height, width  # Never upsample.
    scale = shorter_side / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_image(
    ref: ExampleRef, shorter_side: int | None, allow_non_rgb: bool
) -> tuple[np.ndarray, tuple[int, int], bytes | None]:
    """Reads, checks and decodes `ref.image_path`, downscaled to `shorter_side` if larger.

    Returns:
        (RGB uint8 [h, w, 3], source (height, width), the file's bytes if the image is its
        unchanged full-size JPEG decode else None).
    """
    path = ref.image_path
    data = _read_bytes(path, "image", ref)
    _check_complete(data, path, "image")
    mode, height, width = _image_header(data, path, "image")
    if mode != "RGB" and not allow_non_rgb:
        kind = _MODE_NAMES.get(mode, "non-RGB")
        raise DataError(
            f"{path}: {kind} image (PIL mode {mode!r}); expected 3-channel RGB "
            "(--allow_non_rgb converts it)"
        )
    if data[:2] == b"\xff\xd8":
        _check_jpeg_data(data, path, "image")
    target = _target_size(height, width, shorter_side)
    # JPEG DCT scaling decodes at 1/2, 1/4 or 1/8 size for a fraction of the cost; keep the
    # reduced image at least as large as the target so INTER_AREA only ever shrinks.
    flag = cv2.IMREAD_COLOR
    for factor, reduced in (
        (8, cv2.IMREAD_REDUCED_COLOR_8),
        (4, cv2.IMREAD_REDUCED_COLOR_4),
        (2, cv2.IMREAD_REDUCED_COLOR_2),
    ):
        if height // factor >= target[0] and width // factor >= target[1]:
            flag = reduced
            break
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise DataError(f"{path}: corrupt image: OpenCV cannot decode it")
    if bgr.shape[:2] != target:
        bgr = cv2.resize(bgr, (target[1], target[0]), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    unchanged = mode == "RGB" and data[:2] == b"\xff\xd8" and target == (height, width)
    return rgb, (height, width), data if unchanged else None


def read_binary_mask(
    path: Path, ref: ExampleRef, size: tuple[int, int], target: tuple[int, int]
) -> np.ndarray:
    """Reads a single-channel 0/255 PNG mask of image size `size`; returns {0, 1} uint8 [target]."""
    data = _read_bytes(path, "mask", ref)
    _check_complete(data, path, "mask")
    if _image_header(data, path, "mask")[0] == "P":
        mask = _palette_mask(data, path)
    else:
        mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DataError(f"{path}: corrupt mask: OpenCV cannot decode it")
    if mask.ndim != 2:
        raise DataError(f"{path}: mask has {mask.shape[2]} channels; expected single-channel")
    if mask.dtype != np.uint8:
        raise DataError(f"{path}: mask is {mask.dtype}; expected 8-bit 0/255")
    if mask.shape != size:
        raise DataError(
            f"{path}: mask size {mask.shape[0]}x{mask.shape[1]} != image size "
            f"{size[0]}x{size[1]} ({ref.image_path.name})"
        )
    counts = np.bincount(mask.ravel(), minlength=256)
    counts[[0, 255]] = 0
    if counts.any():
        bad = np.flatnonzero(counts)
        raise DataError(
            f"{path}: non-binary mask: values {bad[:8].tolist()} besides 0/255 "
            f"({int(counts.sum())} pixels)"
        )
    if mask.shape != target:
        mask = cv2.resize(mask, (target[1], target[0]), interpolation=cv2.INTER_NEAREST)
    return (mask > 127).astype(np.uint8)


def _palette_mask(data: bytes, path: Path) -> np.ndarray:
    """A palette (P mode) mask as its grey values; cv2 would expand it to 3 channels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            index = np.asarray(im)
            colours = np.zeros((256, 3), np.uint8)
            palette = np.asarray(im.getpalette() or [], np.uint8).reshape(-1, 3)[:256]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: corrupt mask: {e}") from None
    colours[: len(palette)] = palette
    used = colours[np.unique(index)]
    if (used != used[:, :1]).any():
        raise DataError(
            f"{path}: palette (P mode) mask with non-grey colours; expected single-channel 0/255"
        )
    return colours[index, 0]


def read_thesis_labels(
    path: Path, ref: ExampleRef, size: tuple[int, int], target: tuple[int, int]
) -> np.ndarray:
    """Reads thesis labels (`smgt`, 0..6) of image size `size`; returns uint8 [target]."""
    if not path.is_file():
        raise DataError(f"{path}: label file not found for {ref.id} (listed in {ref.origin})")
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise DataError(f"{path}: cannot read MATLAB labels: {e}") from None
    if "smgt" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no 'smgt' key (keys found: {found})")
    smgt = np.asarray(mat["smgt"])
    if smgt.ndim != 2 or not (np.issubdtype(smgt.dtype, np.number) or smgt.dtype == bool):
        raise DataError(f"{path}: 'smgt' is {smgt.dtype} {smgt.shape}; expected a 2-D label map")
    if smgt.shape != size:
        raise DataError(
            f"{path}: label size {smgt.shape[0]}x{smgt.shape[1]} != image size "
            f"{size[0]}x{size[1]} ({ref.image_path.name})"
        )
    bad = (smgt < 0) | (smgt > 6) | (smgt != np.round(smgt))
    if bad.any():
        values = np.unique(smgt[bad])[:8].tolist()
        raise DataError(f"{path}: labels outside 0..6: {values} ({int(bad.sum())} pixels)")
    smgt = smgt.astype(np.uint8)
    if smgt.shape != target:
        smgt = cv2.resize(smgt, (target[1], target[0]), interpolation=cv2.INTER_NEAREST)
    return smgt
