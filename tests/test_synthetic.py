"""Tests of dermseg_jax.data.synthetic: determinism, layout, class balance and visibility."""

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
