"""The built-in synthetic data set: dermoscopy-like images with exact structure masks.

Each image is skin (tone, low-frequency blotches, pores noise, a few hairs) with one brownish
lesion with an irregular border, and a dark circular dermoscope field-of-view vignette on some
images. The five structures are drawn with their real look, and each mask covers the region
where its texture is drawn (as ISIC masks are regions, not line pixels):

- pigment network (~80% of images): a reticular grid of dark-brown lines over a sector of the
  lesion; mask = that sector.
- negative network (~10%): the inverse, light serpiginous lines on a darker background, with
  larger cells; mask = its sector.
- streaks (~10%): dark radial lines crossing the lesion border in one angular sector; mask =
  the peripheral band they cover.
- globules (~40%): a cluster of dark round dots; mask = the dots, slightly dilated.
- milia-like cysts (~25%): small bright white-yellow round spots; mask = the spots, dilated.

Structures sit in separate angular sectors of the lesion, so overlaps are small (cysts may lie
on a network). This 'default' profile scales every structure with the image; the 'isic2018'
profile (`synthetic_isic`, `profile='isic2018'`) draws ISIC-sized images with structures at a
fixed pixel scale and the ISIC 2018 frequencies, for benchmarks at full resolution.

Everything is deterministic given the seed: image i of a split uses
`numpy.random.default_rng([seed, split_index, i])`, so one split does not change when another
split's size changes. `write_dataset` writes the ISIC 2018 layout read by
`sources.list_isic2018` (with Task 1 lesion masks).
"""

import functools
import os
from pathlib import Path

import cv2
import numpy as np

from dermseg_jax import labels
from dermseg_jax.data import sources, synthetic_isic
from dermseg_jax.data import synthetic_draw as draw

# Probability that an image holds each structure, in labels.STRUCTURE_NAMES order.
STRUCTURE_PROBS = (0.25, 0.1, 0.8, 0.1, 0.4)
DEFAULT_IMAGE_SIZE = (288, 384)
PROFILES = ("default", "isic2018")
# The image size each profile is meant for (height, width).
PROFILE_IMAGE_SIZES = {"default": DEFAULT_IMAGE_SIZE, "isic2018": synthetic_isic.IMAGE_SIZE}
_ID_BASE = 9_000_000
_SPLIT_DIRS = {"train": "Training", "validation": "Validation", "test": "Test"}
_CYST, _NEG_NET, _PIG_NET, _STREAKS, _GLOBULES = range(labels.NUM_STRUCTURES)


def _draw_network(image, region, les, rng, *, negative: bool) -> None:
    s = max(les.scale, 0.6)  # finer cells than ~5 px alias into noise on small images
    period = (rng.uniform(12, 15) if negative else rng.uniform(7.5, 10)) * s
    width = max(1.2, (rng.uniform(2.4, 3.2) if negative else rng.uniform(1.8, 2.4)) * s)
    draw.draw_network(
        image, region, les.xx, les.yy, rng, period=period, width=width, negative=negative
    )


def _draw_streaks(image, mask, les, rng, centre: float, width: float) -> None:
    spacing = rng.uniform(6, 9) * les.scale
    thickness = max(1, round(2 * les.scale))
    draw.draw_streak_lines(image, les, rng, centre, width, spacing=spacing, thickness=thickness)
    in_band = (les.rho >= 0.68) & (les.rho <= 1.14)
    mask[in_band & (draw.angle_diff(les.theta, centre) <= width / 2 + 0.04)] = 1


def _draw_dots(image, mask, les, rng, centres, radius_range, color, halo: bool) -> None:
    # Below ~2 px a dot is a speck that the first convolutions blur away.
    smallest = 1.5 if halo else 2.0
    radii = [max(smallest, rng.uniform(*radius_range) * les.scale) for _ in centres]
    draw.draw_dots(image, mask, centres, radii, color, halo=halo)


def _sectors(rng: np.random.Generator, widths: dict[int, float]) -> dict[int, tuple[float, float]]:
    """Places angular sectors (centre, width) side by side around the lesion, without overlap."""
    total = sum(widths.values()) + 0.15 * len(widths)
    fit = min(1.0, (2 * np.pi - 0.3) / total) if widths else 1.0
    start, placed = rng.uniform(-np.pi, np.pi), {}
    for k in rng.permutation(list(widths)) if widths else []:
        w = widths[int(k)] * fit
        placed[int(k)] = (start + w / 2, w)
        start += w + 0.15
    return placed


def _dot_centres(rng, les, n, theta_range, rho_range):
    thetas = rng.uniform(*theta_range, n)
    rhos = np.sqrt(rng.uniform(rho_range[0] ** 2, rho_range[1] ** 2, n))
    return [les.point(t, r) for t, r in zip(thetas, rhos, strict=True)]


def generate_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    profile: str = "default",
    present: np.ndarray | None = None,
) -> draw.SyntheticImage:
    """Draws one synthetic dermoscopy image with its masks.

    Args:
        rng: the image's random generator (all randomness comes from it).
        height, width: image size in pixels (at least 32).
        profile: one of `PROFILES`: 'default' (structures scale with the image, frequent and
            large) or 'isic2018' (fixed pixel scale, ISIC 2018 Task 2 frequencies; see
            `synthetic_isic`).
        present: bool [5], the structures to draw; default: drawn from `rng` with the
            profile's frequencies (`STRUCTURE_PROBS`, `synthetic_isic.PRESENCE`).

    Returns:
        A `SyntheticImage` with image [H, W, 3], structures [H, W, 5], lesion [H, W].
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown synthetic profile {profile!r}; choose from {PROFILES}")
    if min(height, width) < 32:
        raise ValueError(f"synthetic images need at least 32x32 pixels, got {height}x{width}")
    if profile == "isic2018":
        return synthetic_isic.generate_image(rng, height, width, present)
    drawn = rng.random(labels.NUM_STRUCTURES) < np.asarray(STRUCTURE_PROBS)
    present = drawn if present is None else np.asarray(present, bool)
    les = draw.Lesion(rng, height, width)
    image, lesion = draw.paint_skin_and_lesion(rng, les)
    structures = np.zeros((height, width, labels.NUM_STRUCTURES), np.uint8)
    widths = {}
    if present[_PIG_NET]:
        widths[_PIG_NET] = rng.uniform(2.2, 3.4)
    if present[_NEG_NET]:
        widths[_NEG_NET] = rng.uniform(1.5, 2.3)
    if present[_GLOBULES]:
        widths[_GLOBULES] = rng.uniform(1.2, 1.9)
    sectors = _sectors(rng, widths)
    if present[_STREAKS]:
        streak_mask = np.zeros((height, width), np.uint8)
        centre, width_ = rng.uniform(-np.pi, np.pi), rng.uniform(0.9, 1.6)
        _draw_streaks(image, streak_mask, les, rng, centre, width_)
        structures[..., _STREAKS] = streak_mask
        lesion |= streak_mask
    for k, negative in ((_PIG_NET, False), (_NEG_NET, True)):
        if k in sectors:
            centre, width_ = sectors[k]
            inner_rho = rng.uniform(0.12, 0.3)
            region = (
                (draw.angle_diff(les.theta, centre) <= width_ / 2)
                & (les.rho >= inner_rho)
                & (les.rho <= 0.88)
                & (structures[..., _STREAKS] == 0)
            )
            _draw_network(image, region, les, rng, negative=negative)
            structures[..., k] = region
    if present[_GLOBULES]:
        centre, width_ = sectors[_GLOBULES]
        n = int(rng.integers(10, 24))
        dots = _dot_centres(rng, les, n, (centre - width_ / 2, centre + width_ / 2), (0.2, 0.6))
        color = rng.uniform([35, 20, 15], [65, 40, 28])
        globules = np.zeros((height, width), np.uint8)
        _draw_dots(image, globules, les, rng, dots, (3.0, 4.5), color, False)
        structures[..., _GLOBULES] = globules
    if present[_CYST]:
        n = int(rng.integers(3, 9))
        dots = _dot_centres(rng, les, n, (-np.pi, np.pi), (0.1, 0.8))
        color = rng.uniform([230, 225, 185], [250, 245, 220])
        # Cysts are drawn last and cover what is under them, so other masks give those up.
        cysts = np.zeros((height, width), np.uint8)
        _draw_dots(image, cysts, les, rng, dots, (2.2, 3.4), color, True)
        structures[cysts > 0] = 0
        structures[..., _CYST] = cysts

    # Dots on the border may reach past it; the lesion includes every structure.
    lesion |= structures.any(-1).astype(np.uint8)
    return draw.SyntheticImage(draw.finish(image, les, rng), structures, lesion)


def image_id(split: str, index: int) -> str:
    """The ID of image `index` of `split`: `ISIC_9<split digit><5 digits>`."""
    if not 0 <= index < 100_000:
        raise ValueError(f"synthetic splits hold at most 100000 images, got index {index}")
    return f"ISIC_{_ID_BASE + 100_000 * sources.SPLITS.index(split) + index:07d}"


def _write_png(path: Path, mask: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", mask * np.uint8(255))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    path.write_bytes(buf.tobytes())


def _write_one(
    out: Path, split: str, index: int, *, seed: int, size, vary_size: bool, profile: str
) -> None:
    rng = np.random.default_rng([seed, sources.SPLITS.index(split), index])
    present = None
    if profile == "isic2018":  # a benchmark's small splits must hold the rare structures
        present = synthetic_isic.scheduled_presence([seed, sources.SPLITS.index(split)], index)
    height, width = size
    if vary_size:
        height = max(32, round(height * rng.uniform(0.9, 1.1)))
        width = max(32, round(width * rng.uniform(0.9, 1.1)))
    example = generate_image(rng, height, width, profile=profile, present=present)
    name, iid = _SPLIT_DIRS[split], image_id(split, index)
    bgr = cv2.cvtColor(example.image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(
        ".jpg",
        bgr,
        [
            cv2.IMWRITE_JPEG_QUALITY,
            95,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        ],
    )
    if not ok:
        raise OSError(f"JPEG encoding failed for {iid}")
    (out / f"ISIC2018_Task1-2_{name}_Input" / f"{iid}.jpg").write_bytes(buf.tobytes())
    for k, structure in enumerate(labels.STRUCTURE_NAMES):
        path = out / f"ISIC2018_Task2_{name}_GroundTruth" / f"{iid}_attribute_{structure}.png"
        _write_png(path, example.structures[..., k])
    _write_png(
        out / f"ISIC2018_Task1_{name}_GroundTruth" / f"{iid}_segmentation.png", example.lesion
    )


def write_dataset(
    out: str | os.PathLike,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    vary_size: bool = True,
    num_workers: int = 2,
    profile: str = "default",
) -> dict[str, int]:
    """Writes the synthetic set in the ISIC 2018 Task 1-2 layout under `out`.

    Args:
        out: destination folder (created; existing files are overwritten).
        n_train, n_val, n_test: images per split (a split with 0 images is not written).
        seed: the data set's seed; the same arguments give byte-identical files.
        image_size: (height, width), or one int for square images (default: the profile's
            size in `PROFILE_IMAGE_SIZES`).
        vary_size: vary each side by up to +-10% per image, as real photos vary.
        num_workers: drawing threads.
        profile: one of `PROFILES` (see `generate_image`).

    Returns:
        Images written per split, e.g. {'train': 200, 'validation': 50, 'test': 50}.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown synthetic profile {profile!r}; choose from {PROFILES}")
    image_size = PROFILE_IMAGE_SIZES[profile] if image_size is None else image_size
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"image_size must be (height, width) >= 32, got {image_size!r}")
    out = Path(out)
    counts = {"train": n_train, "validation": n_val, "test": n_test}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"negative number of {split} images: {n}")
    for split, n in counts.items():
        if n == 0:
            continue
        name = _SPLIT_DIRS[split]
        for folder in (
            f"ISIC2018_Task1-2_{name}_Input",
            f"ISIC2018_Task2_{name}_GroundTruth",
            f"ISIC2018_Task1_{name}_GroundTruth",
        ):
            (out / folder).mkdir(parents=True, exist_ok=True)
        # A non-image file, as in the real release, which readers must ignore.
        (out / f"ISIC2018_Task1-2_{name}_Input" / "LICENSE.txt").write_text(
            "Synthetic images generated by dermseg_jax.data.synthetic (public domain).\n"
        )
        jobs = range(n)
        write = functools.partial(
            _write_one, out, split, seed=seed, size=size, vary_size=vary_size, profile=profile
        )
        for result in sources.parallel_map(write, jobs, num_workers):
            if isinstance(result, Exception):
                raise result
    return {split: n for split, n in counts.items() if n > 0}
