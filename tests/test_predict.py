"""Tests of dermseg_jax.predict: input listing, image reading, outputs, and the CLI's errors."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from test_evaluator import EvalFixture, build_eval_fixture

from dermseg_jax import checkpointing, labels, predict
from dermseg_jax.data import eval_pipeline
from dermseg_jax.errors import UserError

jax.config.update("jax_disable_most_optimizations", True)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory) -> EvalFixture:
    return build_eval_fixture(tmp_path_factory.getbasetemp() / "dermseg_eval_fixture")


def _unreadable_entries(folder: pathlib.Path) -> list[str]:
    """A dangling symlink and a directory, both named like images, in `folder`."""
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "folder.jpg").mkdir()
    return ["dangling.jpg", "folder.jpg"]


def test_list_images_expands_directories_and_keeps_unreadable_entries(tmp_path):
    for name in ("b.JPG", "a.png", "c.jpeg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    unreadable = _unreadable_entries(tmp_path)
    listed = predict.list_images([str(tmp_path), str(tmp_path / "a.png")])
    assert [p.name for p in listed] == sorted(["a.png", "b.JPG", "c.jpeg", *unreadable])
    with pytest.raises(UserError, match="missing.jpg: no such file"):
        predict.list_images([str(tmp_path / "missing.jpg")])


def test_list_images_refuses_duplicate_ids_and_empty_directories(tmp_path):
    (tmp_path / "X.jpg").write_bytes(b"x")
    (tmp_path / "X.JPEG").write_bytes(b"x")
    with pytest.raises(UserError, match=r"X.JPEG and .*X.jpg have the same image id X"):
        predict.list_images([str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="empty: no .*jpg.* file in this directory"):
        predict.list_images([str(empty)])


def test_read_image_errors_name_the_file(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "good.jpg", quality=95)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    _unreadable_entries(tmp_path)
    assert predict.read_image(tmp_path / "good.jpg").shape == (20, 30, 3)
    for name, problem in [
        ("truncated.jpg", "cannot decode"),
        ("text.png", "not a JPEG or PNG"),
        ("absent.jpg", "not found"),
        ("dangling.jpg", "broken symbolic link"),
        ("folder.jpg", "a directory, not an image"),
    ]:
        with pytest.raises(predict.ImageReadError, match=f"{name}: .*{problem}"):
            predict.read_image(tmp_path / name)
    grey = (rgb[..., 0] // 2).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(predict.read_image(tmp_path / "grey.png")[..., 1], grey)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    deep = np.random.default_rng(1).integers(0, 65536, (12, 9), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    image = predict.read_image(tmp_path / "deep.png")
    assert image.dtype == np.uint8 and image.shape == (12, 9, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], deep >> 8)


def test_predict_traces_once_writes_original_size_masks_and_skips_bad_files(
    eval_fixture, tmp_path, capsys, monkeypatch
):
    traces = []
    eval_example_fn = eval_pipeline.eval_example_fn

    def counting_eval_example_fn(data_cfg):
        transform = eval_example_fn(data_cfg)

        def traced(example):
            traces.append(example["image"].shape)
            return transform(example)

        return traced

    monkeypatch.setattr(eval_pipeline, "eval_example_fn", counting_eval_example_fn)
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted(eval_fixture.val_images.glob("*.jpg"))[:2]
    for source in sources:
        shutil.copy(source, images / f"photo_{source.name}")
    # Other sizes, so that one trace for all images is a real test of the input signature.
    for size in ((61, 83), (97, 40)):
        Image.open(sources[0]).resize(size).save(images / f"resized_{size[0]}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    unreadable = _unreadable_entries(images)
    config = tmp_path / "config.py"
    config.write_text(
        "from dermseg_jax.configs import tiny\n\n\ndef get_config():\n    return tiny.get_config()\n"
    )
    out = tmp_path / "out"
    result = predict.run_predict(
        str(eval_fixture.model_dir),
        [str(images)],
        str(out),
        config_path=str(config),
        batch_size=2,
        progress=False,
    )
    assert len(traces) == 1
    assert sorted(result["written"]) == sorted(
        [p.stem for p in sources] + ["resized_61", "resized_97"]
    )
    failed = sorted(pathlib.Path(name).name for name, _ in result["failed"])
    assert failed == sorted(["broken.jpg", *unreadable])
    assert "3 skipped" in capsys.readouterr().out
    for source in sources:
        size = Image.open(source).size
        for name in labels.STRUCTURE_NAMES:
            mask = Image.open(out / f"{source.stem}_attribute_{name}.png")
            assert mask.mode == "L" and mask.size == size
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
        overlay = Image.open(out / "overlays" / f"{source.stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == size
    resized = Image.open(out / f"resized_97_attribute_{labels.STRUCTURE_NAMES[0]}.png")
    assert resized.size == (97, 40)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "dermseg_jax.predict", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("predict: error:")]


def test_cli_lists_unreadable_images_and_exits_1(eval_fixture, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sorted(eval_fixture.val_images.glob("*.jpg"))[0], images / "good.jpg")
    _unreadable_entries(images)
    proc = _run_cli(
        f"--workdir={eval_fixture.model_dir}",
        f"--images={images}",
        f"--out={tmp_path / 'out'}",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "1 image(s) written" in proc.stdout and "2 skipped" in proc.stdout
    assert f"{images / 'dangling.jpg'}: broken symbolic link" in proc.stdout
    assert f"{images / 'folder.jpg'}: a directory, not an image file" in proc.stdout
    assert (tmp_path / "out" / f"good_attribute_{labels.STRUCTURE_NAMES[0]}.png").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_workdir", "nowhere: neither a training workdir"),
        ("missing_checkpoint", "checkpoints: no checkpoint"),
        ("out_is_a_file", "--out=.*taken.txt: exists and is not a directory"),
        ("duplicate_ids", "X.(jpg|JPEG) and .*X.(jpg|JPEG) have the same image id X"),
        ("empty_folder", "empty: no .*jpg.* file in this directory"),
        ("missing_image", "absent.jpg: no such file or directory"),
        ("bad_flag", "flag --batch_size=0: 0 is not a positive integer"),
    ],
)
def test_cli_bad_inputs_fail_in_one_line_and_write_nothing(eval_fixture, tmp_path, case, expected):
    image = sorted(eval_fixture.val_images.glob("*.jpg"))[0]
    args = {
        "workdir": str(eval_fixture.model_dir),
        "images": str(image),
        "out": str(tmp_path / "out"),
    }
    extra: list[str] = []
    if case == "missing_workdir":
        args["workdir"] = str(tmp_path / "nowhere")
    elif case == "missing_checkpoint":
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        checkpointing.save_run_config(tmp_path / "run", eval_fixture.config())
        args["workdir"] = str(tmp_path / "run")
    elif case == "out_is_a_file":
        args["out"] = str(tmp_path / "taken.txt")
        pathlib.Path(args["out"]).write_text("keep me")
    elif case == "duplicate_ids":
        for name in ("X.jpg", "X.JPEG"):
            shutil.copy(image, tmp_path / name)
        args["images"] = f"{tmp_path / 'X.jpg'},{tmp_path / 'X.JPEG'}"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args["images"] = str(tmp_path / "empty")
    elif case == "missing_image":
        args["images"] = f"{image},{tmp_path / 'absent.jpg'}"
    elif case == "bad_flag":
        extra = ["--batch_size=0"]
    proc = _run_cli(*(f"--{k}={v}" for k, v in args.items()), *extra)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and re.search(expected, errors[0]), errors
    assert not (tmp_path / "out").exists()
    if case == "out_is_a_file":
        assert pathlib.Path(args["out"]).read_text() == "keep me"


def test_tiled_predict_shows_each_images_tiles_and_set_overrides_apply(
    eval_fixture, tmp_path, capsys
):
    images = tmp_path / "images"
    images.mkdir()
    source = sorted(eval_fixture.val_images.glob("*.jpg"))[0]
    Image.open(source).resize((400, 150)).save(images / "ISIC_0000001.png")  # several tiles
    result = predict.run_predict(
        str(eval_fixture.model_dir),
        [str(images)],
        str(tmp_path / "out"),
        overrides=["eval.inference=tiles", "eval.tile_overlap=0.5"],
        batch_size=2,
        progress=True,
    )
    assert result["written"] == ["ISIC_0000001"]
    err = capsys.readouterr().err
    assert "ISIC_0000001" in err and "tile" in err  # the per-image bar over its tiles
    mask = Image.open(tmp_path / "out" / f"ISIC_0000001_attribute_{labels.STRUCTURE_NAMES[0]}.png")
    assert mask.size == (400, 150)
    with pytest.raises(UserError, match="--set"):
        predict.run_predict(
            str(eval_fixture.model_dir), [str(images)], str(tmp_path / "o2"), overrides=["x=1"]
        )
