"""Tests of dermseg_jax.data.decoding: damaged files that cv2 would decode without an error."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_sources import make_isic2018

from dermseg_jax import labels
from dermseg_jax.data import sources


def _ref(root: Path) -> sources.ExampleRef:
    (ref,) = sources.list_examples("isic2018", root, "train", task1_dir=root)
    return ref


def _mask_path(root: Path) -> Path:
    return root / "ISIC2018_Task2_Training_GroundTruth_v3" / "ISIC_0000000_attribute_globules.png"


@pytest.mark.parametrize("fill", [b"\x00" * 40, bytes(range(100, 140))])
def test_jpeg_with_corrupt_middle_is_named_corrupt(tmp_path, fill):
    make_isic2018(tmp_path, n=1)
    ref = _ref(tmp_path)
    data = bytearray(ref.image_path.read_bytes())
    middle = data.rfind(b"\xff\xda") + (len(data) - data.rfind(b"\xff\xda")) // 2
    data[middle : middle + len(fill)] = fill
    ref.image_path.write_bytes(bytes(data))
    # The failure this catches: cv2 decodes the file, libjpeg only warns on stderr.
    assert cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(sources.DataError, match="ISIC_0000000.jpg: corrupt JPEG image: Corrupt"):
        sources.read_example(ref)


def test_png_mask_with_trailing_bytes_reads_as_without_them(tmp_path):
    make_isic2018(tmp_path, n=1)
    expected = sources.read_example(_ref(tmp_path)).structures
    path = _mask_path(tmp_path)
    path.write_bytes(path.read_bytes() + bytes(range(100)))
    np.testing.assert_array_equal(sources.read_example(_ref(tmp_path)).structures, expected)


def test_png_mask_cut_inside_its_chunks_is_truncated(tmp_path):
    make_isic2018(tmp_path, n=1)
    path = _mask_path(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-20] + b"IEND" + bytes(16))  # an IEND string, but no IEND chunk
    with pytest.raises(sources.DataError, match="globules.png: truncated PNG mask"):
        sources.read_example(_ref(tmp_path))


def _save_palette_mask(path: Path, mask: np.ndarray, colours: list[int]) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(colours)
    image.save(path)


def test_grey_palette_mask_is_read_through_its_palette(tmp_path):
    make_isic2018(tmp_path, n=1)
    expected = sources.read_example(_ref(tmp_path)).structures
    globules = expected[..., list(labels.STRUCTURE_NAMES).index("globules")]
    _save_palette_mask(_mask_path(tmp_path), globules, [0, 0, 0, 255, 255, 255])
    assert Image.open(_mask_path(tmp_path)).mode == "P"
    np.testing.assert_array_equal(sources.read_example(_ref(tmp_path)).structures, expected)


def test_colour_palette_mask_is_reported_as_palette(tmp_path):
    make_isic2018(tmp_path, n=1)
    mask = np.zeros(cv2.imread(str(_mask_path(tmp_path)), cv2.IMREAD_UNCHANGED).shape, np.uint8)
    mask[:4] = 1
    _save_palette_mask(_mask_path(tmp_path), mask, [0, 0, 0, 255, 0, 0])
    with pytest.raises(sources.DataError, match=r"globules.png: palette \(P mode\) mask"):
        sources.read_example(_ref(tmp_path))
