"""Tests of dermseg_jax.data.synthetic: determinism, layout, class balance and visibility.

The 'isic2018' profile's own properties are tested in test_synthetic_isic.py."""

import hashlib
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from dermseg_jax import labels
from dermseg_jax.data import synthetic

CYST, NEG_NET, PIG_NET, STREAKS, GLOBULES = range(5)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kwargs = dict(n_train=3, n_val=1, n_test=1, image_size=(48, 64))
    synthetic.write_dataset(tmp_path / "a", seed=7, **kwargs)
    synthetic.write_dataset(tmp_path / "b", seed=7, num_workers=1, **kwargs)
    synthetic.write_dataset(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_default_profile_draws_the_same_images_as_before_the_profiles():
    # Digests of the default generator's output taken before the drawing code was shared with
    # the 'isic2018' profile: the demo's and the tests' data must not change.
    digest = hashlib.sha256()
    for i in range(24):  # 24 small images hold every structure at least once
        ex = synthetic.generate_image(np.random.default_rng([11, i]), 64, 80)
        for array in (ex.image, ex.structures, ex.lesion):
            digest.update(array.tobytes())
    assert digest.hexdigest() == (
        "ea55ecdf350ac473f0c8982bfc3de4cebe9d1aa5783ddcf38ce0d2130e1a486e"
    )
    ex = synthetic.generate_image(np.random.default_rng([0, 0, 0]), *synthetic.DEFAULT_IMAGE_SIZE)
    full = hashlib.sha256(ex.image.tobytes() + ex.structures.tobytes() + ex.lesion.tobytes())
    assert full.hexdigest() == "a04dd4cc5f18478c3520193393d98100da20e51938bf5e3015220c2ee20ce09b"


def test_isic2018_profile_writes_its_sizes_deterministically(tmp_path):
    kwargs = dict(n_train=2, n_val=1, n_test=0, seed=3, image_size=(96, 160), vary_size=False)
    synthetic.write_dataset(tmp_path / "a", profile="isic2018", **kwargs)
    synthetic.write_dataset(tmp_path / "b", profile="isic2018", **kwargs)
    synthetic.write_dataset(tmp_path / "c", **kwargs)
    a, b, default = (_files(tmp_path / d) for d in "abc")
    assert a == b
    assert a.keys() == default.keys() and a != default
    for name, data in a.items():
        if name.suffix in (".jpg", ".png"):
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            assert decoded.shape[:2] == (96, 160), name


def test_isic2018_profile_defaults_to_isic_sized_images(tmp_path):
    synthetic.write_dataset(
        tmp_path, n_train=1, n_val=0, n_test=0, vary_size=False, profile="isic2018"
    )
    (jpg,) = tmp_path.glob("*_Input/*.jpg")
    assert cv2.imread(str(jpg)).shape == (1000, 1500, 3)
    assert synthetic.PROFILE_IMAGE_SIZES["isic2018"] == (1000, 1500)


def test_rejects_unknown_profiles(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic profile 'isic2017'"):
        synthetic.write_dataset(tmp_path, n_train=1, n_val=0, n_test=0, profile="isic2017")
    with pytest.raises(ValueError, match="unknown synthetic profile"):
        synthetic.generate_image(np.random.default_rng(0), 64, 64, profile="")


def test_writes_the_isic2018_layout_with_lesion_masks(tmp_path):
    counts = synthetic.write_dataset(tmp_path, n_train=2, n_val=1, n_test=0, image_size=40)
    assert counts == {"train": 2, "validation": 1}
    names = {str(p) for p in _files(tmp_path)}
    iid = synthetic.image_id("train", 1)
    assert f"ISIC2018_Task1-2_Training_Input/{iid}.jpg" in names
    assert f"ISIC2018_Task1_Training_GroundTruth/{iid}_segmentation.png" in names
    for name in labels.STRUCTURE_NAMES:
        assert f"ISIC2018_Task2_Training_GroundTruth/{iid}_attribute_{name}.png" in names
    assert not any("Test" in n for n in names)


def test_one_split_does_not_depend_on_the_size_of_another(tmp_path):
    synthetic.write_dataset(tmp_path / "a", n_train=1, n_val=1, n_test=0, image_size=40)
    synthetic.write_dataset(tmp_path / "b", n_train=3, n_val=1, n_test=0, image_size=40)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    val = [k for k in a if "Validation" in str(k)]
    assert val and all(a[k] == b[k] for k in val)


@pytest.fixture(scope="module")
def images():
    return [synthetic.generate_image(np.random.default_rng([3, i]), 72, 96) for i in range(100)]


def test_masks_are_binary_and_inside_the_lesion(images):
    for ex in images:
        assert ex.image.dtype == ex.structures.dtype == ex.lesion.dtype == np.uint8
        assert ex.image.shape == (72, 96, 3) and ex.structures.shape == (72, 96, 5)
        assert set(np.unique(ex.structures)) <= {0, 1} and set(np.unique(ex.lesion)) <= {0, 1}
        assert not (ex.structures.any(-1) & (ex.lesion == 0)).any()


def test_class_imbalance_is_roughly_as_intended(images):
    present = np.array([ex.structures.any((0, 1)) for ex in images]).mean(0)
    low = np.array(synthetic.STRUCTURE_PROBS) - 0.12
    high = np.array(synthetic.STRUCTURE_PROBS) + 0.12
    assert np.all((present >= np.maximum(low, 0.02)) & (present <= high)), present
    assert present[PIG_NET] > 0.65 and present[NEG_NET] < 0.25 and present[STREAKS] < 0.25


def test_overlaps_between_structures_are_small(images):
    for ex in images:
        covered = ex.structures.any(-1).sum()
        overlapping = (ex.structures.sum(-1) > 1).sum()
        assert overlapping <= 0.1 * max(covered, 1)


def test_structures_are_visible_where_their_masks_are(images):
    plain, regions = [], {k: [] for k in range(5)}
    for ex in images:
        grey = ex.image.astype(np.float32).mean(-1)
        detail = np.abs(grey - cv2.GaussianBlur(grey, (0, 0), 2))
        lesion_only = (ex.lesion == 1) & ~ex.structures.any(-1)
        if lesion_only.sum() > 20:
            plain.append((grey[lesion_only].mean(), detail[lesion_only].mean()))
        for k in range(5):
            m = ex.structures[..., k] == 1
            if m.sum() > 20:
                regions[k].append((grey[m].mean(), detail[m].mean()))
    plain_mean, plain_detail = np.mean(plain, 0)
    mean = {k: np.mean(v, 0) for k, v in regions.items()}
    # Dots: cysts bright, globules dark, against the plain lesion.
    assert mean[CYST][0] > plain_mean + 25
    assert mean[GLOBULES][0] < plain_mean - 10
    # Networks and streaks are textures: much more fine detail than the plain lesion.
    for k in (NEG_NET, PIG_NET, STREAKS):
        assert mean[k][1] > 1.5 * plain_detail, (labels.STRUCTURE_NAMES[k], mean[k], plain_detail)


def test_rejects_tiny_images():
    with pytest.raises(ValueError, match="at least 32x32"):
        synthetic.generate_image(np.random.default_rng(0), 16, 64)


def _make_synthetic(*args) -> subprocess.CompletedProcess:
    script = Path(__file__).parents[1] / "scripts" / "make_synthetic.py"
    command = [sys.executable, str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--size", "20x30"], "--size"),
        (["--size", "big"], "--size 'big'"),
        (["--n", "2", "--n-test", "-1"], "negative number of test images"),
    ],
)
def test_make_synthetic_fails_in_one_line_before_writing(tmp_path, args, named):
    proc = _make_synthetic("--out", tmp_path / "raw", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("make_synthetic: error:") and named in line
    assert not (tmp_path / "raw").exists()


def test_make_synthetic_writes_the_isic2018_profile(tmp_path):
    args = ["--n", "2", "--n-val", "0", "--n-test", "0", "--seed", "1", "--fixed-size"]
    proc = _make_synthetic(
        "--out", tmp_path / "raw", "--profile", "isic2018", "--size", "64x96", *args
    )
    assert proc.returncode == 0, proc.stderr
    synthetic.write_dataset(
        tmp_path / "api",
        n_train=2,
        n_val=0,
        n_test=0,
        seed=1,
        image_size=(64, 96),
        vary_size=False,
        profile="isic2018",
    )
    assert _files(tmp_path / "raw") == _files(tmp_path / "api")
