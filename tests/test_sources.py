"""Tests of dermseg_jax.data.sources: the three raw layouts and their validation."""

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from dermseg_jax import labels
from dermseg_jax.data import sources, synthetic

H, W = 40, 48


def _image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)


def _masks(seed: int, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    structures = (rng.random((h, w, labels.NUM_STRUCTURES)) < 0.3).astype(np.uint8)
    lesion = (rng.random((h, w)) < 0.6).astype(np.uint8)
    return structures, lesion


def make_isic2018(root: Path, n: int = 3, split_dir: str = "Training") -> list[str]:
    """Writes n examples of the ISIC 2018 Task 1-2 layout; returns their IDs."""
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    input_dir = root / f"ISIC2018_Task1-2_{split_dir}_Input"
    input_dir.mkdir(parents=True, exist_ok=True)
    (root / f"ISIC2018_Task2_{split_dir}_GroundTruth_v3").mkdir(exist_ok=True)
    for i, image_id in enumerate(ids):
        _write_jpeg(input_dir / f"{image_id}.jpg", _image(i))
        structures, lesion = _masks(i)
        for k, name in enumerate(labels.STRUCTURE_NAMES):
            gt = root / f"ISIC2018_Task2_{split_dir}_GroundTruth_v3"
            _write_png(gt / f"{image_id}_attribute_{name}.png", structures[..., k] * 255)
        seg = root / f"ISIC2018_Task1_{split_dir}_GroundTruth" / f"{image_id}_segmentation.png"
        _write_png(seg, lesion * 255)
    # Files of the real release that are not images.
    (input_dir / "LICENSE.txt").write_text("CC-BY-NC")
    (input_dir / "ATTRIBUTION.txt").write_text("ISIC")
    (input_dir / "metadata.csv").write_text("id\n")
    return ids


def make_thesis(root: Path, n: int = 3, split: str = "train") -> tuple[Path, list[np.ndarray]]:
    """Writes n examples of the thesis' ISIC 2017 layout; returns (splits dir, smgt maps)."""
    dirs = {"train": "Training", "validation": "Validation", "test": "Test_v2"}
    files = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
    ids, smgts = [f"ISIC_{i:07d}" for i in range(n)], []
    for i, image_id in enumerate(ids):
        _write_jpeg(root / f"ISIC-2017_{dirs[split]}_Data" / f"{image_id}.jpg", _image(i))
        smgt = np.random.default_rng(i).integers(0, 7, (H, W)).astype(np.uint8)
        gt = root / f"ISIC-2017_{dirs[split]}_Part2_GroundTruth" / "gtann"
        gt.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(gt / f"{image_id}.mat", {"smgt": smgt})
        smgts.append(smgt)
    splits_dir = root / "splits"
    splits_dir.mkdir(exist_ok=True)
    # Reverse order, CRLF line endings and blank lines, as in the thesis' train.txt.
    (splits_dir / files[split]).write_bytes(
        b"\r\n".join(i.encode() for i in reversed(ids)) + b"\r\n\r\n"
    )
    return splits_dir, smgts[::-1]


def test_isic2018_reader_round_trips_masks_and_ignores_non_images(tmp_path):
    ids = make_isic2018(tmp_path)
    refs = sources.list_examples("isic2018", tmp_path, "train", task1_dir=tmp_path)
    assert [r.id for r in refs] == ids
    for i, ref in enumerate(refs):
        example = sources.read_example(ref)
        structures, lesion = _masks(i)
        np.testing.assert_array_equal(example.structures, structures)
        np.testing.assert_array_equal(example.lesion, lesion)
        source = cv2.cvtColor(cv2.imread(str(ref.image_path)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(example.image, source)
        assert example.original_size == (H, W)
        assert example.jpeg_bytes == ref.image_path.read_bytes()


def test_isic2018_without_task1_has_no_lesion_mask(tmp_path):
    make_isic2018(tmp_path, n=1)
    (ref,) = sources.list_examples("isic2018", tmp_path, "train")
    assert sources.read_example(ref).lesion is None


def test_thesis_reader_follows_split_file_and_label_convention(tmp_path):
    splits_dir, smgts = make_thesis(tmp_path)
    refs = sources.list_examples("isic2017-thesis", tmp_path, "train", splits_dir=splits_dir)
    assert [r.id for r in refs] == ["ISIC_0000002", "ISIC_0000001", "ISIC_0000000"]
    for ref, smgt in zip(refs, smgts, strict=True):
        example = sources.read_example(ref)
        for k in range(labels.NUM_STRUCTURES):
            np.testing.assert_array_equal(example.structures[..., k], smgt == k + 2)
        np.testing.assert_array_equal(example.lesion, smgt > 0)


def test_default_thesis_splits_are_the_repository_files():
    counts = {
        split: len(sources.read_split_file(sources.DEFAULT_THESIS_SPLITS_DIR / name))
        for split, name in (("train", "train.txt"), ("val", "val.txt"), ("test", "test.txt"))
    }
    assert counts == {"train": 1590, "val": 101, "test": 463}


def test_synthetic_layout_is_read_by_the_isic2018_reader_with_lesions(tmp_path):
    synthetic.write_dataset(tmp_path, n_train=2, n_val=1, n_test=0, image_size=(48, 64))
    assert sources.available_splits("synthetic", tmp_path) == ("train", "validation")
    refs = sources.list_examples("synthetic", tmp_path, "validation")
    example = sources.read_example(refs[0])
    assert example.lesion is not None and example.lesion.any()
    assert example.structures.shape == example.image.shape[:2] + (5,)


def test_downscales_large_images_with_dct_scaling_and_nearest_masks(tmp_path):
    h, w = 256, 384
    make_isic2018(tmp_path, n=0)
    image = cv2.resize(_image(0, 32, 48), (w, h), interpolation=cv2.INTER_NEAREST)
    _write_jpeg(tmp_path / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg", image)
    blocks = (np.random.default_rng(0).random((h // 4, w // 4, 5)) < 0.5).astype(np.uint8)
    structures = blocks.repeat(4, 0).repeat(4, 1)
    for k, name in enumerate(labels.STRUCTURE_NAMES):
        gt = tmp_path / "ISIC2018_Task2_Training_GroundTruth_v3"
        _write_png(gt / f"ISIC_0000000_attribute_{name}.png", structures[..., k] * 255)
    (ref,) = sources.list_examples("isic2018", tmp_path, "train")
    example = sources.read_example(ref, shorter_side=64)
    assert example.image.shape == (64, 96, 3)
    assert example.original_size == (h, w)
    assert example.jpeg_bytes is None
    np.testing.assert_array_equal(example.structures, blocks)
    # DCT-scaled decode + area resize keeps the picture: compare with a full decode.
    expected = cv2.resize(image, (96, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(example.image.astype(int) - expected).mean() < 12
    full = sources.read_example(ref, shorter_side=None)
    assert full.image.shape == (h, w, 3)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not an image" * 10)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _grey(path: Path) -> None:
    cv2.imwrite(str(path), _image(0)[..., 0], [cv2.IMWRITE_JPEG_QUALITY, 95])


def _rgba(path: Path) -> None:
    # A PNG with an alpha channel saved under the .jpg name.
    ok, buf = cv2.imencode(".png", np.dstack([_image(0), np.full((H, W), 255, np.uint8)]))
    path.write_bytes(buf.tobytes())


def _mask_path(root: Path, name: str = "globules") -> Path:
    return root / "ISIC2018_Task2_Training_GroundTruth_v3" / f"ISIC_0000001_attribute_{name}.png"


ISIC2018_BAD = {
    "corrupt_jpeg": (lambda r, i: _corrupt(i), "ISIC_0000001.jpg", "corrupt image"),
    "truncated_jpeg": (lambda r, i: _truncate(i), "ISIC_0000001.jpg", "truncated JPEG"),
    "grey_image": (lambda r, i: _grey(i), "ISIC_0000001.jpg", "grey-scale image"),
    "rgba_image": (lambda r, i: _rgba(i), "ISIC_0000001.jpg", "RGBA image"),
    "missing_mask": (lambda r, i: _mask_path(r).unlink(), "attribute_globules.png", "not found"),
    "wrong_size_mask": (
        lambda r, i: _write_png(_mask_path(r), np.zeros((H - 1, W), np.uint8)),
        "attribute_globules.png",
        "mask size 39x48 != image size 40x48",
    ),
    "non_binary_mask": (
        lambda r, i: _write_png(_mask_path(r), np.full((H, W), 128, np.uint8)),
        "attribute_globules.png",
        r"non-binary mask: values \[128\]",
    ),
    "missing_lesion_mask": (
        lambda r, i: (
            r / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000001_segmentation.png"
        ).unlink(),
        "ISIC_0000001_segmentation.png",
        "not found",
    ),
}


@pytest.mark.parametrize("case", sorted(ISIC2018_BAD))
def test_isic2018_bad_input_raises_naming_file_and_problem(tmp_path, case, caplog):
    make_isic2018(tmp_path)
    spoil, file_name, problem = ISIC2018_BAD[case]
    spoil(tmp_path, tmp_path / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000001.jpg")
    refs = sources.list_examples("isic2018", tmp_path, "train", task1_dir=tmp_path)
    with pytest.raises(sources.DataError, match=problem) as info:
        sources.validate_examples(refs, num_workers=2)
    message = str(info.value)
    assert file_name in message and "1 of 3" in message and "\n" not in message
    assert info.value.hint == "--skip_bad skips them" and "=True" not in message
    with caplog.at_level(logging.WARNING):
        good, problems = sources.validate_examples(refs, skip_bad=True, num_workers=2)
    assert [r.id for r in good] == ["ISIC_0000000", "ISIC_0000002"]
    assert "1 of 3 train examples are bad" in caplog.text and file_name in caplog.text
    assert len(problems) == 1 and file_name in problems[0]


def test_entries_named_like_images_are_reported_not_dropped(tmp_path):
    make_isic2018(tmp_path, n=2)
    input_dir = tmp_path / "ISIC2018_Task1-2_Training_Input"
    (input_dir / "ISIC_0000005.jpg").symlink_to(tmp_path / "gone.jpg")  # dangling
    (input_dir / "ISIC_0000006.jpg").mkdir()
    _write_jpeg(input_dir / "photo.png", _image(0))
    _write_jpeg(input_dir / "._ISIC_0000000.jpg", _image(0))  # hidden (macOS metadata)
    refs = sources.list_examples("isic2018", tmp_path, "train", task1_dir=tmp_path)
    assert len(refs) == 5
    with pytest.raises(sources.DataError, match="3 of 5 train examples are bad") as info:
        sources.validate_examples(refs, num_workers=2)
    for problem in (
        "ISIC_0000005.jpg: image is a broken symbolic link",
        "ISIC_0000006.jpg: image is a folder, not a file",
        "photo.png: image name is not ISIC_<7 digits>.jpg",
    ):
        assert problem in str(info.value)
    good, problems = sources.validate_examples(refs, skip_bad=True, num_workers=2)
    assert [r.id for r in good] == ["ISIC_0000000", "ISIC_0000001"] and len(problems) == 3


def test_duplicate_ids_raise_naming_both_files(tmp_path):
    make_isic2018(tmp_path, n=2)
    input_dir = tmp_path / "ISIC2018_Task1-2_Training_Input"
    (input_dir / "ISIC_0000001.JPEG").write_bytes((input_dir / "ISIC_0000001.jpg").read_bytes())
    with pytest.raises(sources.DataError, match="ID ISIC_0000001 also used by") as info:
        sources.list_examples("isic2018", tmp_path, "train")
    assert "ISIC_0000001.JPEG" in str(info.value) and "ISIC_0000001.jpg" in str(info.value)


def test_non_rgb_error_names_the_cli_flag(tmp_path):
    make_isic2018(tmp_path, n=1)
    _grey(tmp_path / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg")
    (ref,) = sources.list_examples("isic2018", tmp_path, "train")
    with pytest.raises(sources.DataError, match=r"\(--allow_non_rgb converts it\)"):
        sources.read_example(ref)


def test_allow_non_rgb_converts_grey_scale(tmp_path):
    make_isic2018(tmp_path, n=1)
    _grey(tmp_path / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg")
    (ref,) = sources.list_examples("isic2018", tmp_path, "train")
    example = sources.read_example(ref, allow_non_rgb=True)
    assert example.image.shape == (H, W, 3) and example.jpeg_bytes is None


def _mat_path(root: Path) -> Path:
    return root / "ISIC-2017_Training_Part2_GroundTruth" / "gtann" / "ISIC_0000001.mat"


THESIS_BAD = {
    "labels_outside_0_6": (
        lambda r: scipy.io.savemat(_mat_path(r), {"smgt": np.full((H, W), 7, np.uint8)}),
        "ISIC_0000001.mat",
        r"labels outside 0\.\.6: \[7\]",
    ),
    "missing_smgt_key": (
        lambda r: scipy.io.savemat(_mat_path(r), {"labels": np.zeros((H, W), np.uint8)}),
        "ISIC_0000001.mat",
        r"no 'smgt' key \(keys found: \['labels'\]\)",
    ),
    "wrong_size_labels": (
        lambda r: scipy.io.savemat(_mat_path(r), {"smgt": np.zeros((H, W + 2), np.uint8)}),
        "ISIC_0000001.mat",
        "label size 40x50 != image size 40x48",
    ),
    "id_without_files": (
        lambda r: (r / "splits" / "train.txt").write_text(
            "ISIC_0000000\nISIC_0000001\nISIC_0000002\nISIC_9999999\n"
        ),
        "ISIC_9999999.jpg",
        r"image not found for ISIC_9999999 \(listed in .*train\.txt:4\)",
    ),
}


@pytest.mark.parametrize("case", sorted(THESIS_BAD))
def test_thesis_bad_input_raises_naming_file_and_problem(tmp_path, case):
    splits_dir, _ = make_thesis(tmp_path)
    spoil, file_name, problem = THESIS_BAD[case]
    spoil(tmp_path)
    refs = sources.list_examples("isic2017-thesis", tmp_path, "train", splits_dir=splits_dir)
    with pytest.raises(sources.DataError, match=problem) as info:
        sources.validate_examples(refs, num_workers=2)
    assert file_name in str(info.value)
    good, problems = sources.validate_examples(refs, skip_bad=True, num_workers=2)
    assert len(good) == len(refs) - 1 and file_name in problems[0]


def test_empty_splits_raise(tmp_path):
    make_isic2018(tmp_path, n=0)
    with pytest.raises(sources.DataError, match="Training_Input: empty split 'train'"):
        sources.list_examples("isic2018", tmp_path, "train")
    splits_dir = tmp_path / "splits"
    splits_dir.mkdir()
    (splits_dir / "val.txt").write_text("\r\n\r\n")
    with pytest.raises(sources.DataError, match="val.txt: empty split"):
        sources.list_examples("isic2017-thesis", tmp_path, "validation", splits_dir=splits_dir)


def test_all_bad_split_raises_even_with_skip_bad(tmp_path):
    make_isic2018(tmp_path, n=1)
    _truncate(tmp_path / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg")
    refs = sources.list_examples("isic2018", tmp_path, "train")
    with pytest.raises(sources.DataError, match="all 1 examples are bad"):
        sources.validate_examples(refs, skip_bad=True)
