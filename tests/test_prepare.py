"""Tests of dermseg_jax.data.prepare and tfds_builder: the prepared TFDS directory, and the CLI's
refusals (one line, exit status 2, nothing written or deleted)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from test_sources import make_isic2018, make_thesis

from dermseg_jax import labels
from dermseg_jax.data import prepare, sources, staging, synthetic
from dermseg_jax.errors import UserError

SIZE = (48, 64)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    out = tmp_path_factory.mktemp("prepared") / "data"
    summary = prepare.prepare(
        "synthetic",
        root,
        out,
        n=6,
        n_val=2,
        n_test=2,
        image_size=SIZE,
        num_workers=2,
        progress=False,
    )
    return root, out, summary


def test_prepared_dir_is_readable_without_the_builder(prepared):
    root, out, summary = prepared
    builder = tfds.builder_from_directory(out)
    assert set(builder.info.splits) == {"train", "validation", "test"}
    assert builder.info.splits["train"].num_examples == 6
    features = builder.info.features
    assert features["image"].shape == (None, None, 3)
    assert features["image"].encoding_format == "jpeg"
    assert features["structures"].shape == (None, None, 5)
    assert features["lesion"].shape == (None, None, 1)
    for name, dtype in (
        ("structures", np.uint8),
        ("lesion", np.uint8),
        ("image", np.uint8),
        ("has_lesion_mask", np.bool_),
        ("original_height", np.int32),
        ("original_width", np.int32),
    ):
        assert features[name].np_dtype == dtype, name
    assert summary["splits"] == {"train": 6, "validation": 2, "test": 2}


def test_prepared_examples_equal_the_raw_files(prepared):
    root, out, _ = prepared
    refs = {r.id: r for r in sources.list_examples("synthetic", root, "validation")}
    ds = tfds.builder_from_directory(out).as_dataset(
        split="validation", decoders={"image": tfds.decode.SkipDecoding()}
    )
    seen = set()
    for ex in tfds.as_numpy(ds):
        image_id = ex["id"].decode()
        raw = sources.read_example(refs[image_id], shorter_side=None)
        np.testing.assert_array_equal(ex["structures"], raw.structures)
        np.testing.assert_array_equal(ex["lesion"][..., 0], raw.lesion)
        assert ex["has_lesion_mask"]
        assert (ex["original_height"], ex["original_width"]) == raw.original_size
        # The source JPEG is stored unchanged: an accurate decode gives OpenCV's pixels.
        assert ex["image"] == refs[image_id].image_path.read_bytes()
        image = tf.io.decode_jpeg(ex["image"], channels=3, dct_method="INTEGER_ACCURATE")
        np.testing.assert_array_equal(image.numpy(), raw.image)
        seen.add(image_id)
    assert seen == set(refs)


def test_class_counts_json_matches_training_masks(prepared):
    root, out, summary = prepared
    counts = prepare.load_class_counts(out)
    assert counts == summary["class_counts"] and counts["split"] == "train"
    assert counts["images"] == 6 and counts["lesion_mask_images"] == 6
    refs = sources.list_examples("synthetic", root, "train")
    examples = [sources.read_example(r, shorter_side=None) for r in refs]
    label_pixels = np.zeros(labels.NUM_CLASSES, np.int64)
    for ex in examples:
        label_pixels += np.bincount(
            labels.label_from_structures(ex.structures).ravel(), minlength=labels.NUM_CLASSES
        )
    assert counts["class_pixels"] == label_pixels.tolist()
    assert sum(counts["class_pixels"]) == counts["total_pixels"]
    assert counts["lesion_pixels"] == sum(int(ex.lesion.sum()) for ex in examples)
    assert (
        counts["structure_images"]
        == np.sum([ex.structures.any((0, 1)) for ex in examples], 0).tolist()
    )
    assert sum(counts["class_pixels_lesion_crop"]) < counts["total_pixels"]
    weights = np.asarray(summary["class_weights"])
    np.testing.assert_allclose(weights, prepare.class_weights_from_counts(counts), rtol=1e-6)
    assert json.loads((out / prepare.SUMMARY_FILE).read_text())["splits"]["train"] == 6


def test_class_weights_are_normalised_inverse_frequency():
    counts = {"class_pixels": [1000, 10, 0, 100, 50, 40]}
    inverse = np.array([1 / 1000, 1 / 10, 0, 1 / 100, 1 / 50, 1 / 40])
    np.testing.assert_allclose(
        prepare.class_weights_from_counts(counts), inverse / inverse.sum(), rtol=1e-6
    )
    with pytest.raises(ValueError, match="6 entries"):
        prepare.class_weights_from_counts({"class_pixels": [1, 2]})


def test_bad_file_fails_before_writing_and_skip_bad_skips_it(tmp_path):
    raw = tmp_path / "raw"
    synthetic.write_dataset(raw, n_train=3, n_val=0, n_test=0, image_size=SIZE)
    bad = raw / "ISIC2018_Task1-2_Training_Input" / f"{synthetic.image_id('train', 1)}.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "out"
    with pytest.raises(sources.DataError, match=f"{bad.name}: truncated JPEG"):
        prepare.prepare("isic2018", raw, out, task1_dir=raw, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["raw"]
    summary = prepare.prepare("isic2018", raw, out, task1_dir=raw, skip_bad=True, progress=False)
    assert summary["splits"] == {"train": 2} and summary["skipped"] == {"train": 1}
    assert f"{bad}: truncated JPEG" in summary["skipped_examples"]["train"][0]
    assert tfds.builder_from_directory(out).info.splits["train"].num_examples == 2
    with pytest.raises(UserError, match="not empty"):
        prepare.prepare("isic2018", raw, out, task1_dir=raw, skip_bad=True, progress=False)
    # A re-prepare over its own output replaces it (here skipping in the builder instead).
    (out / "extra.txt").write_text("replaced with the folder")
    again = prepare.prepare(
        "isic2018",
        raw,
        out,
        task1_dir=raw,
        skip_bad=True,
        validate_first=False,
        overwrite=True,
        progress=False,
    )
    assert again["skipped"] == {"train": 1} and bad.name in again["skipped_examples"]["train"][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]
    assert not (out / "extra.txt").exists() and staging.is_prepared(out)


def test_thesis_layout_prepares_with_downscaling(tmp_path):
    splits_dir, _ = make_thesis(tmp_path / "raw", n=2)
    summary = prepare.main(
        [
            "--format=isic2017-thesis",
            f"--root={tmp_path / 'raw'}",
            f"--out={tmp_path / 'out'}",
            f"--splits_dir={splits_dir}",
            "--shorter_side=20",
            "--num_workers=1",
        ]
    )
    assert summary["splits"] == {"train": 2}
    ds = tfds.builder_from_directory(tmp_path / "out").as_dataset(split="train")
    for ex in tfds.as_numpy(ds):
        assert ex["image"].shape == (20, 24, 3) and ex["structures"].shape == (20, 24, 5)
        assert (ex["original_height"], ex["original_width"]) == (40, 48)
        assert ex["has_lesion_mask"]


def test_ensure_synthetic_prepares_once_and_reuses(tmp_path):
    kwargs = dict(n_train=3, n_val=1, n_test=0, seed=1, image_size=SIZE)
    data_dir = prepare.ensure_synthetic(tmp_path, **kwargs)
    stamp = (data_dir / prepare.SUMMARY_FILE).stat().st_mtime_ns
    assert prepare.ensure_synthetic(tmp_path, **kwargs) == data_dir
    assert (data_dir / prepare.SUMMARY_FILE).stat().st_mtime_ns == stamp
    builder = tfds.builder_from_directory(data_dir)
    assert set(builder.info.splits) == {"train", "validation"}
    other = prepare.ensure_synthetic(tmp_path, **{**kwargs, "seed": 2})
    assert other != data_dir
    # Only the two prepared sets remain: no temporary folders are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([data_dir.name, other.name])


def _cli(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dermseg_jax.data.prepare", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `prepare: error:` line of a refused run (exit status 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("prepare: error: ")]
    return line


def _snapshot(folder: Path) -> dict[Path, object]:
    """Every path under `folder` with its content (a link's target, None for a folder)."""
    return {
        p: p.readlink() if p.is_symlink() else None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case", ["out_is_root", "out_holds_root", "out_is_a_user_folder"])
def test_overwrite_never_touches_inputs_or_foreign_folders(tmp_path, case):
    raw = tmp_path / "p" / "raw"
    make_isic2018(raw, n=1)
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    out = {"out_is_root": raw, "out_holds_root": tmp_path / "p", "out_is_a_user_folder": user}
    before = _snapshot(tmp_path)
    proc = _cli(
        "--format=isic2018",
        f"--root={raw}",
        f"--task1_dir={raw}",
        "--overwrite",
        f"--out={out[case]}",
    )
    assert f"{out[case]}: " in _error_line(proc)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args, named",
    [
        (["--out={tmp}/a_file", "--n=2"], "{tmp}/a_file: --out is a file"),
        (["--out={tmp}/deep/out", "--n=0"], "--n 0: "),
        (["--out={tmp}/deep/out", "--size=axb"], "--size 'axb': expected HEIGHTxWIDTH"),
        (["--out={tmp}/deep/out", "--size=0x5"], "--size '0x5': expected HEIGHTxWIDTH"),
        (["--out={tmp}/deep/out", "--root={tmp}/nope", "--format=isic2018"], "{tmp}/nope: --root"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_writing(tmp_path, args, named):
    (tmp_path / "a_file").write_text("keep")
    before = _snapshot(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    fmt = [] if any(a.startswith("--format") for a in args) else ["--format=synthetic"]
    assert named.format(tmp=tmp_path) in _error_line(_cli(*fmt, *args))
    assert _snapshot(tmp_path) == before  # no half-made --out or parent folder


def _spoil_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = data.rfind(b"\xff\xda") + (len(data) - data.rfind(b"\xff\xda")) // 2
    data[middle : middle + 40] = bytes(40)
    path.write_bytes(bytes(data))


def test_unreadable_and_corrupt_images_fail_naming_each_file(tmp_path):
    raw = tmp_path / "raw"
    make_isic2018(raw, n=2)
    images = raw / "ISIC2018_Task1-2_Training_Input"
    (images / "ISIC_0000005.jpg").symlink_to(tmp_path / "gone.jpg")
    (images / "ISIC_0000006.jpg").mkdir()
    _spoil_middle(images / "ISIC_0000001.jpg")
    before = _snapshot(tmp_path)
    proc = _cli("--format=isic2018", f"--root={raw}", f"--out={tmp_path}/deep/out")
    line = _error_line(proc)
    assert "3 of 4 train examples are bad" in line and "prepare: hint: --skip_bad" in proc.stderr
    assert "ISIC_0000001.jpg: corrupt JPEG image" in line
    assert "ISIC_0000005.jpg: image is a broken symbolic link" in line
    assert "ISIC_0000006.jpg: image is a folder" in line
    assert _snapshot(tmp_path) == before


def test_duplicate_ids_fail_naming_both_files_without_dumping_images(tmp_path):
    raw = tmp_path / "raw"
    make_isic2018(raw, n=2)
    images = raw / "ISIC2018_Task1-2_Training_Input"
    (images / "ISIC_0000001.JPEG").write_bytes((images / "ISIC_0000001.jpg").read_bytes())
    proc = _cli("--format=isic2018", f"--root={raw}", f"--out={tmp_path}/out")
    assert "ISIC_0000001.JPEG: ID ISIC_0000001 also used by ISIC_0000001.jpg" in _error_line(proc)
    assert len(proc.stderr) < 1000 and not (tmp_path / "out").exists()


def _start_and_wait_for_staging(out: Path, log: Path) -> subprocess.Popen:
    """Starts a synthetic prepare into `out`; returns once its temporary folder is set up."""
    command = [sys.executable, "-m", "dermseg_jax.data.prepare", "--format=synthetic"]
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [*command, f"--out={out}", "--n=4", "--size=64x64"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    while True:
        for owner in out.parent.glob(f".{out.name}.dermseg-prepare-*/{staging.OWNER_FILE}"):
            try:
                json.loads(owner.read_text())
                return proc
            except (OSError, ValueError):
                pass  # being written
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)


def test_killed_runs_leave_no_temporary_folder_behind(tmp_path):
    out, log = tmp_path / "w" / "data", tmp_path / "stderr.txt"
    foreign = out.parent / ".data.dermseg-prepare-foreign"  # no owner file: not ours
    foreign.mkdir(parents=True)
    proc = _start_and_wait_for_staging(out, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGTERM and "Traceback" not in log.read_text()
    assert [p.name for p in out.parent.iterdir()] == [foreign.name]
    proc = _start_and_wait_for_staging(out, log)
    proc.kill()
    proc.wait()
    assert len(list(out.parent.iterdir())) == 2  # SIGKILL runs no cleanup
    prepare.prepare("synthetic", None, out, n=2, image_size=SIZE, num_workers=1, progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == [foreign.name, "data"]
