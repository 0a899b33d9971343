"""Tests of the 'isic2018' synthetic profile: fixed pixel scale, ISIC 2018 frequencies and pixel
shares, overlaps, determinism. Statistics are measured on small images: the profile's structure
sizes and shares do not depend on the image size."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dermseg_jax import labels
from dermseg_jax.data import synthetic, synthetic_isic

CYST, NEG_NET, PIG_NET, STREAKS, GLOBULES = range(5)
N_IMAGES, SMALL = 300, (200, 300)


def _isic(key, height, width, present=None):
    rng = np.random.default_rng(key)
    return synthetic.generate_image(rng, height, width, profile="isic2018", present=present)


@pytest.fixture(scope="module")
def images():
    """A split as `write_dataset` draws it: presence spread evenly by the schedule."""
    schedule = [synthetic_isic.scheduled_presence([4], i) for i in range(N_IMAGES)]
    return [_isic([4, i], *SMALL, present) for i, present in enumerate(schedule)]


@pytest.fixture(scope="module")
def shares(images):
    """Pixel share of each structure per image, float [N, 5]."""
    return np.array([ex.structures.mean((0, 1), dtype=np.float64) for ex in images])


def test_sizes_are_honoured_and_masks_are_binary_inside_the_lesion(images):
    for h, w in ((1000, 1500), (97, 211)):
        ex = _isic([0, h], h, w)
        assert ex.image.shape == (h, w, 3) and ex.structures.shape == (h, w, 5)
        assert ex.lesion.shape == (h, w)
    for ex in images:
        assert ex.image.dtype == ex.structures.dtype == ex.lesion.dtype == np.uint8
        assert set(np.unique(ex.structures)) <= {0, 1} and set(np.unique(ex.lesion)) <= {0, 1}
        assert not (ex.structures.any(-1) & (ex.lesion == 0)).any()


def test_presence_frequencies_match_isic2018(shares):
    # Every scheduled structure is drawn, and the schedule hits the frequencies to one image.
    counts = (shares > 0).sum(0)
    target = N_IMAGES * np.asarray(synthetic_isic.PRESENCE)
    assert np.all(np.abs(counts - target) <= 1), (counts, target)


@pytest.mark.parametrize("n", [30, 40, 200])
def test_any_split_holds_each_structure_at_its_frequency(n):
    target = n * np.asarray(synthetic_isic.PRESENCE)
    for key in ([0, 0], [0, 1], [0, 2], [7, 1]):
        counts = sum(synthetic_isic.scheduled_presence(key, i) for i in range(n))
        assert np.all((counts >= np.floor(target)) & (counts <= np.floor(target) + 1)), counts


def test_presence_without_a_schedule_is_drawn_at_the_isic2018_frequencies():
    n = 400
    present = np.mean([_isic([6, i], 48, 64).structures.any((0, 1)) for i in range(n)], 0)
    target = np.asarray(synthetic_isic.PRESENCE)
    tolerance = 3 * np.sqrt(target * (1 - target) / n)
    assert np.all(np.abs(present - target) <= tolerance), (present, target)


def test_pixel_shares_match_isic2018(shares):
    present = shares > 0
    target = np.asarray(synthetic_isic.PIXEL_SHARE)
    # The area of a present structure, the generator's own quantity, is tight ...
    conditional = shares.sum(0) / present.sum(0)
    expected = target / np.asarray(synthetic_isic.PRESENCE)
    assert np.all(np.abs(conditional / expected - 1) <= 0.25), (conditional, expected)
    # ... and so is the share over all images for the structures frequent enough to measure it
    # on a few hundred images (7 % and 4 % presence leave 10-20 images for the rare ones).
    overall = shares.mean(0)
    for k in (CYST, PIG_NET, GLOBULES):
        assert abs(overall[k] / target[k] - 1) <= 0.15, (labels.STRUCTURE_NAMES[k], overall[k])


def test_structures_overlap(images):
    overlapping = [ex for ex in images if (ex.structures.sum(-1) > 1).any()]
    assert len(overlapping) >= 0.1 * N_IMAGES
    pairs = {
        (a, b)
        for ex in overlapping
        for a in range(5)
        for b in range(a + 1, 5)
        if (ex.structures[..., a] & ex.structures[..., b]).any()
    }
    assert {(CYST, PIG_NET), (PIG_NET, GLOBULES)} <= pairs, pairs


def test_structures_are_visible_where_their_masks_are(images):
    plain, dots = [], {CYST: [], GLOBULES: []}
    for ex in images:
        grey = ex.image.astype(np.float32).mean(-1)
        lesion_only = (ex.lesion == 1) & ~ex.structures.any(-1)
        plain.append(grey[lesion_only].mean())
        for k in dots:
            if ex.structures[..., k].any() and not ex.structures[..., PIG_NET].any():
                dots[k].append(grey[ex.structures[..., k] == 1].mean())
    assert np.mean(dots[CYST]) > np.mean(plain) + 25
    assert np.mean(dots[GLOBULES]) < np.mean(plain) - 5


def _first_with(structures, height, width, profile="isic2018"):
    """The first image of seed [2, i] holding all of `structures`."""
    for i in range(100):
        rng = np.random.default_rng([2, i])
        ex = synthetic.generate_image(rng, height, width, profile=profile)
        if all(ex.structures[..., k].any() for k in structures):
            return ex
    raise AssertionError(f"no image with structures {structures}")


def _line_width(ex) -> float:
    """The median width of the pigment network's dark lines, in pixels: twice the distance to
    the nearest light pixel along the lines' ridges, where dark means below the middle of the
    local grey range. Anti-aliasing and the optical blur add 1-2 px to the drawn width."""
    grey = ex.image.astype(np.float32).mean(-1)
    inner = cv2.erode(ex.structures[..., PIG_NET], np.ones((9, 9), np.uint8)) > 0
    window = np.ones((15, 15), np.uint8)
    middle = (cv2.erode(grey, window) + cv2.dilate(grey, window)) / 2
    dark = ((grey < middle) & inner).astype(np.uint8)
    distance = cv2.distanceTransform(dark, cv2.DIST_L2, 5)
    ridge = (distance > 0) & (distance >= cv2.dilate(distance, np.ones((3, 3), np.uint8)))
    return 2 * float(np.median(distance[ridge]))


def _globule_radii(ex) -> np.ndarray:
    """The largest inscribed radius of each connected globule in the mask, in pixels."""
    mask = ex.structures[..., GLOBULES]
    n, components = cv2.connectedComponents(mask)
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    return np.array([distance[components == c].max() for c in range(1, n)])


@pytest.mark.parametrize("size", [(500, 750), (1000, 1500)])
def test_lines_and_globules_are_a_few_pixels_wide_at_any_image_size(size):
    ex = _first_with((PIG_NET, GLOBULES), *size)
    # Lines drawn 2-3 px wide (4-5 px wide lines measure 6).
    assert 2 <= _line_width(ex) <= 5
    # Globules are separate dots of 4-7 px plus the mask's 1.5 px rim.
    radii = _globule_radii(ex)
    assert len(radii) >= 20
    assert radii.min() >= 3 and radii.max() <= 6


def test_default_profile_structures_grow_with_the_image():
    # The measures above tell the profiles apart: default structures scale with the image.
    ex = _first_with((PIG_NET, GLOBULES), 1000, 1500, profile="default")
    assert _line_width(ex) > 7
    assert _globule_radii(ex).max() > 8


def test_same_key_same_image_other_key_other_image():
    a, b, c = _isic([5, 1], 64, 96), _isic([5, 1], 64, 96), _isic([5, 2], 64, 96)
    for field in ("image", "structures", "lesion"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.image, c.image)


def test_prepare_cli_makes_the_isic2018_profile(tmp_path):
    out = tmp_path / "data"
    command = [sys.executable, "-m", "dermseg_jax.data.prepare", "--format", "synthetic"]
    command += ["--profile", "isic2018", "--size", "96x128", "--n", "8", "--n_val", "0"]
    command += ["--n_test", "0", "--seed", "5", "--num_workers", "1", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["options"]["profile"] == "isic2018"
    # The training split holds the structures that the isic2018 schedule gives its 8 images.
    scheduled = sum(synthetic_isic.scheduled_presence([5, 0], i) for i in range(8))
    assert list(summary["structure_images"].values()) == scheduled.tolist()
