"""The 'isic2018' synthetic profile: ISIC-sized images with structures at a fixed pixel scale.

The default profile scales every structure with the image and draws them often and large, which
suits a quick demo but hides the two things that make ISIC 2018 Task 2 hard: structures are small
and rare. Here a structure's size is fixed in pixels at full resolution (network lines 2-3 px
wide on a 9-13 px mesh, globules 4-7 px across), so that resizing a 1000x1500 image to a shorter
side of 384 blurs them away, and each structure appears with the ISIC 2018 training set's
per-image frequency (`PRESENCE`) and covers, on average over all images, its pixel share
(`PIXEL_SHARE`). Regions are drawn at independent places, so structures overlap as in ISIC.

A present structure's area is its conditional share (`PIXEL_SHARE / PRESENCE` of the image)
times a log-normal factor of mean 1, and is met exactly for regions (networks, streaks: the
pixels of a ring around the lesion closest in angle to a random direction, with ragged edges)
and to about one dot for dots (globules in one cluster, cysts scattered; dots never touch, so
each one stays a separate blob in its mask). Shares do not depend on the image size, so small
images at the same pixel scale have the same statistics (the tests use that).
"""

import math
from collections.abc import Sequence

import cv2
import numpy as np

from dermseg_jax import labels
from dermseg_jax.data import synthetic_draw as draw

IMAGE_SIZE = (1000, 1500)
# ISIC 2018 Task 2 training set, in labels.STRUCTURE_NAMES order (milia-like cyst, negative
# network, pigment network, streaks, globules): share of images holding the structure, and
# share of all pixels it covers.
PRESENCE = (0.26, 0.07, 0.59, 0.04, 0.23)
PIXEL_SHARE = (0.002, 0.0025, 0.04, 0.0007, 0.006)
# Log-normal sigma of a present structure's area around its conditional share.
AREA_SPREAD = 0.4
# Fixed pixel scale: ranges (low, high) in pixels at full resolution.
PIGMENT_PERIOD, PIGMENT_LINE = (9.0, 13.0), (2.0, 3.0)
NEGATIVE_PERIOD, NEGATIVE_LINE = (16.0, 22.0), (3.0, 4.0)
STREAK_SPACING, STREAK_THICKNESS = (10.0, 14.0), 3
GLOBULE_RADIUS, CYST_RADIUS = (2.0, 3.5), (3.5, 6.0)
_MASK_MARGIN = 1.5  # draw.draw_dots' mask is each dot plus this many pixels
_RAGGED_CELL = 60.0  # pixels: the scale of a region border's wiggles
_CYST, _NEG_NET, _PIG_NET, _STREAKS, _GLOBULES = range(labels.NUM_STRUCTURES)


def _area_targets(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Pixels each structure covers when present: conditional share times a log-normal factor."""
    factor = np.exp(AREA_SPREAD * rng.standard_normal(labels.NUM_STRUCTURES) - AREA_SPREAD**2 / 2)
    return np.asarray(PIXEL_SHARE) / np.asarray(PRESENCE) * factor * height * width


def _sector_region(rng, les, target: float, rho_range, ragged: float):
    """The `target` pixels of the ring rho in `rho_range` closest in angle to a random direction.

    Returns:
        (region bool [H, W], centre angle, half-width in radians).
    """
    h, w = les.rho.shape
    centre = rng.uniform(-np.pi, np.pi)
    ring = (les.rho >= rho_range[0]) & (les.rho <= rho_range[1])
    score = draw.angle_diff(les.theta, centre)
    score += ragged * draw.smooth_noise(rng, h, w, _RAGGED_CELL)
    values = score[ring]
    k = int(min(round(target), values.size))
    if k == 0:
        return np.zeros_like(ring), centre, 0.0
    threshold = np.partition(values, k - 1)[k - 1]
    return ring & (score <= threshold), centre, float(min(threshold, np.pi))


def _candidates(rng, les, radius_max: float, rho_max: float) -> np.ndarray:
    """Random points (x, y) inside rho < rho_max (never empty: the lesion has pixels there),
    enough to pack that area with dots."""
    ys, xs = np.nonzero(les.rho < rho_max)
    footprint = (2 * (radius_max + _MASK_MARGIN) + 1) ** 2
    n = int(3 * len(ys) / footprint) + 1
    pick = rng.integers(len(ys), size=n)
    return np.stack([xs[pick], ys[pick]], -1) + rng.uniform(-0.5, 0.5, (n, 2))


def _place_dots(mask, points, radii, target: float) -> list[int]:
    """Takes `points` in order, skipping any whose mask would touch an earlier one, until the
    mask covers about `target` pixels (at least one dot). Draws into `mask`.

    Returns:
        The indices of the points taken.
    """
    h, w = mask.shape
    taken, area = [], 0
    for i, ((x, y), r) in enumerate(zip(points, radii, strict=True)):
        reach = int(math.ceil(r + _MASK_MARGIN)) + 1
        x0, y0 = max(0, int(x) - reach), max(0, int(y) - reach)
        box = (slice(y0, min(h, int(y) + reach + 2)), slice(x0, min(w, int(x) + reach + 2)))
        if mask[box].any():
            continue
        if taken and area + math.pi * (r + _MASK_MARGIN) ** 2 / 2 > target:
            break  # stopping here is closer to the target, on average, than one more dot
        centre = (int(round(x * 16)), int(round(y * 16)))
        cv2.circle(mask, centre, int(round((r + _MASK_MARGIN) * 16)), 1, -1, cv2.LINE_8, shift=4)
        taken.append(i)
        area += int(mask[box].sum())
    return taken


def _draw_globules(image, les, rng, target: float) -> np.ndarray:
    """A cluster of dark dots: the candidates nearest a random point of the lesion."""
    mask = np.zeros(les.rho.shape, np.uint8)
    points = _candidates(rng, les, GLOBULE_RADIUS[1], 0.85)
    anchor = points[rng.integers(len(points))]
    distance = np.hypot(*(points - anchor).T) * rng.uniform(0.8, 1.25, len(points))
    points = points[np.argsort(distance)]
    radii = rng.uniform(*GLOBULE_RADIUS, len(points))
    taken = _place_dots(mask, points, radii, target)
    color = rng.uniform([35, 20, 15], [65, 40, 28])
    draw.draw_dots(image, mask, points[taken], radii[taken], color, halo=False)
    return mask


def _draw_cysts(image, les, rng, target: float) -> np.ndarray:
    """Bright white-yellow dots with a darker rim, scattered over the lesion."""
    mask = np.zeros(les.rho.shape, np.uint8)
    points = _candidates(rng, les, CYST_RADIUS[1], 0.85)
    radii = rng.uniform(*CYST_RADIUS, len(points))
    taken = _place_dots(mask, points, radii, target)
    color = rng.uniform([230, 225, 185], [250, 245, 220])
    draw.draw_dots(image, mask, points[taken], radii[taken], color, halo=True)
    return mask


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The slices of `mask`'s True pixels' bounding box grown by `margin` (all if empty)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if not len(rows):
        return slice(None), slice(None)
    h, w = mask.shape
    return (
        slice(max(0, rows[0] - margin), min(h, rows[-1] + margin + 1)),
        slice(max(0, cols[0] - margin), min(w, cols[-1] + margin + 1)),
    )


def _draw_networks(image, structures, les, rng, present, targets) -> None:
    """The pigment and negative networks, each over a sector of the lesion."""
    for k, negative in ((_PIG_NET, False), (_NEG_NET, True)):
        if not present[k]:
            continue
        rho_range = (rng.uniform(0.0, 0.25), 1.0) if not negative else (rng.uniform(0.1, 0.4), 0.9)
        region, _, _ = _sector_region(rng, les, targets[k], rho_range, ragged=0.3)
        period = rng.uniform(*(NEGATIVE_PERIOD if negative else PIGMENT_PERIOD))
        line = rng.uniform(*(NEGATIVE_LINE if negative else PIGMENT_LINE))
        box = _bounding_box(region, margin=4)
        draw.draw_network(
            image[box],
            region[box],
            les.xx[box],
            les.yy[box],
            rng,
            period=period,
            width=line,
            negative=negative,
        )
        structures[..., k] = region


def _draw_streaks(image, les, rng, target: float) -> np.ndarray:
    """Radial lines over a sector of a band across the lesion border; returns the band."""
    region, centre, half = _sector_region(rng, les, target, (0.68, 1.14), ragged=0.05)
    spacing = rng.uniform(*STREAK_SPACING)
    draw.draw_streak_lines(
        image, les, rng, centre, 2 * half, spacing=spacing, thickness=STREAK_THICKNESS
    )
    return region


def scheduled_presence(key: Sequence[int], index: int) -> np.ndarray:
    """Which structures image `index` of a series (a split) holds, spread evenly over the series.

    Structure k is present when frac(phase_k + index * PRESENCE[k]) >= 1 - PRESENCE[k], with
    phases drawn from `key`: any n consecutive images then hold it in floor(n * PRESENCE[k]) or
    one more images, so that a 30-image split holds the 4 % streaks once or twice (random draws give
    none 29 % of the time), and image `index` does not depend on the series' length.

    Returns:
        bool [5], in labels.STRUCTURE_NAMES order.
    """
    phase = np.random.default_rng(key).random(labels.NUM_STRUCTURES)
    rate = np.asarray(PRESENCE)
    return (phase + index * rate) % 1 >= 1 - rate


def generate_image(
    rng: np.random.Generator, height: int, width: int, present: np.ndarray | None = None
) -> draw.SyntheticImage:
    """Draws one ISIC-scale synthetic image with its masks (see the module docstring).

    Args:
        rng: the image's random generator (all randomness comes from it).
        height, width: image size in pixels; structure sizes do not depend on it.
        present: bool [5], the structures to draw (e.g. `scheduled_presence`); default: each
            with its `PRESENCE` probability, drawn from `rng`.

    Returns:
        A `SyntheticImage` with image [H, W, 3], structures [H, W, 5], lesion [H, W].
    """
    drawn = rng.random(labels.NUM_STRUCTURES) < np.asarray(PRESENCE)
    present = drawn if present is None else np.asarray(present, bool)
    targets = _area_targets(rng, height, width)
    les = draw.Lesion(rng, height, width)
    image, lesion = draw.paint_skin_and_lesion(rng, les)
    structures = np.zeros((height, width, labels.NUM_STRUCTURES), np.uint8)
    _draw_networks(image, structures, les, rng, present, targets)
    if present[_STREAKS]:
        structures[..., _STREAKS] = _draw_streaks(image, les, rng, targets[_STREAKS])
    if present[_GLOBULES]:
        structures[..., _GLOBULES] = _draw_globules(image, les, rng, targets[_GLOBULES])
    if present[_CYST]:
        structures[..., _CYST] = _draw_cysts(image, les, rng, targets[_CYST])
    lesion |= structures.any(-1).astype(np.uint8)
    return draw.SyntheticImage(draw.finish(image, les, rng), structures, lesion)
