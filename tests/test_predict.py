"""Tests of dermseg_jax.predict: ids, image reading, submission files and bad inputs."""

import pathlib
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from test_evaluator import EvalFixture, build_eval_fixture

from dermseg_jax import labels, predict

jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory) -> EvalFixture:
    return build_eval_fixture(tmp_path_factory.getbasetemp() / "dermseg_eval_fixture")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ISIC_0012345.jpg", "ISIC_0012345"),
        ("scan_ISIC_0012345_copy.PNG", "ISIC_0012345"),
        ("my photo.JPEG", "my photo"),
        ("ISIC_123.jpg", "ISIC_123"),
    ],
)
def test_image_id(name, expected):
    assert predict.image_id(pathlib.Path("/x") / name) == expected


def test_list_images_expands_directories(tmp_path):
    for name in ("b.JPG", "a.png", "c.jpeg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    listed = predict.list_images([str(tmp_path), str(tmp_path / "a.png")])
    assert [p.name for p in listed] == ["a.png", "b.JPG", "c.jpeg"]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        predict.list_images([str(tmp_path / "missing.jpg")])


def test_read_image_errors_name_the_file(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "good.jpg", quality=95)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    assert predict.read_image(tmp_path / "good.jpg").shape == (20, 30, 3)
    for name, problem in [
        ("truncated.jpg", "cannot decode"),
        ("text.png", "not a JPEG or PNG"),
        ("absent.jpg", "not found"),
    ]:
        with pytest.raises(predict.ImageReadError, match=f"{name}.*{problem}"):
            predict.read_image(tmp_path / name)
    grey = (rgb[..., 0] // 2).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(predict.read_image(tmp_path / "grey.png")[..., 1], grey)


def test_submission_files_pass_the_official_loader(tmp_path):
    from isic_challenge_scoring.load_image import load_segmentation_image

    masks = np.zeros((17, 23, 5), np.uint8)
    masks[2:9, 3:11, 2] = 1
    predict.write_submission(tmp_path, "ISIC_0000042", masks)
    for k, name in enumerate(labels.STRUCTURE_NAMES):
        path = tmp_path / f"ISIC_0000042_attribute_{name}.png"
        loaded = load_segmentation_image(path)
        assert loaded.shape == (17, 23) and loaded.dtype == np.uint8
        assert set(np.unique(loaded)) <= {0, 255}
        np.testing.assert_array_equal(loaded > 128, masks[..., k] > 0)


def test_predict_writes_original_size_masks_and_skips_bad_files(eval_fixture, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted(eval_fixture.val_images.glob("*.jpg"))[:2]
    for source in sources:
        shutil.copy(source, images / f"photo_{source.name}")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = tmp_path / "config.py"
    config.write_text(
        "from configs import tiny\n\n\ndef get_config():\n    return tiny.get_config()\n"
    )
    out = tmp_path / "out"
    result = predict.run_predict(
        str(eval_fixture.model_dir),
        [str(images)],
        str(out),
        config_path=str(config),
        progress=False,
    )
    assert sorted(result["written"]) == [p.stem for p in sources]
    assert len(result["failed"]) == 1 and "broken.jpg" in result["failed"][0][0]
    assert "1 skipped" in capsys.readouterr().out
    for source in sources:
        size = Image.open(source).size
        for name in labels.STRUCTURE_NAMES:
            mask = Image.open(out / f"{source.stem}_attribute_{name}.png")
            assert mask.mode == "L" and mask.size == size
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
        overlay = Image.open(out / "overlays" / f"{source.stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == size
