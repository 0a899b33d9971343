"""Drawing primitives shared by the synthetic data profiles (`synthetic`, `synthetic_isic`).

The profiles differ in where structures go and how large they are; the skin, the lesion's polar
frame, the textures and the camera effects are the same code, so that both profiles look alike
and a fix to one primitive reaches both. Every function takes the image's random generator and
draws from it in a fixed order (the default profile's bytes depend on that order).
"""

import dataclasses
import math

import cv2
import numpy as np

VIGNETTE_PROB = 0.35


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticImage:
    """One generated example: image uint8 [H, W, 3] RGB, structures uint8 [H, W, 5] in {0, 1},
    lesion uint8 [H, W] in {0, 1}."""

    image: np.ndarray
    structures: np.ndarray
    lesion: np.ndarray


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth noise in about [-1, 1] with features of `cell` pixels, float32 [H, W]."""
    gh, gw = max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC) * 0.6


def grid_lines(u: np.ndarray, v: np.ndarray, period: float, width: float) -> np.ndarray:
    """Anti-aliased lines of a warped square grid (u, v in cell units), float32 [H, W] in [0, 1]."""
    du = np.abs(u - np.round(u)) * period
    dv = np.abs(v - np.round(v)) * period
    d = np.minimum(du, dv)
    return np.clip(1.0 - (d - width / 2), 0.0, 1.0)


def angle_diff(a: np.ndarray, b: float) -> np.ndarray:
    """|a - b| wrapped to [0, pi]."""
    return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)


def blend(image: np.ndarray, color, alpha: np.ndarray) -> None:
    """Blends `color` into `image` in place with per-pixel weight `alpha` [H, W]."""
    image += (np.asarray(color, np.float32) - image) * alpha[..., None]


class Lesion:
    """The lesion's polar frame: normalised radius rho (1 on the border) and angle theta."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        short = min(height, width)
        self.cy = height / 2 + rng.uniform(-0.06, 0.06) * height
        self.cx = width / 2 + rng.uniform(-0.06, 0.06) * width
        r0 = short * rng.uniform(0.27, 0.36)
        aspect = rng.uniform(0.8, 1.25)
        ks = np.arange(2, 7)
        self.amps = rng.uniform(0.0, 0.12, ks.size) / np.sqrt(ks - 1)
        self.phases = rng.uniform(0, 2 * np.pi, ks.size)
        self.ks = ks
        ax, ay = r0 * math.sqrt(aspect), r0 / math.sqrt(aspect)
        # Keep the lesion plus its streak band (rho <= 1.15) inside the frame.
        reach = (1 + self.amps.sum()) * 1.15
        room_x = min(self.cx, width - self.cx) - 2
        room_y = min(self.cy, height - self.cy) - 2
        shrink = min(1.0, room_x / (ax * reach), room_y / (ay * reach))
        self.ax, self.ay = ax * shrink, ay * shrink
        self.scale = short / 288.0
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        dx, dy = (xx - self.cx) / self.ax, (yy - self.cy) / self.ay
        self.theta = np.arctan2(dy, dx)
        # The border radius from a fine angle table: exact enough, and 20x cheaper than cosines
        # over the whole frame.
        table = self.radius(np.linspace(-np.pi, np.pi, 4097))
        index = np.round((self.theta + np.pi) * (4096 / (2 * np.pi))).astype(np.int32)
        self.rho = np.sqrt(dx * dx + dy * dy) / table[index]
        self.xx, self.yy = xx, yy

    def radius(self, theta):
        """The border's normalised radius at angle(s) `theta`."""
        wobble = self.amps * np.cos(self.ks * np.asarray(theta)[..., None] + self.phases)
        return (1.0 + wobble.sum(-1)).astype(np.float32)

    def point(self, theta: float, rho: float) -> tuple[float, float]:
        """The (x, y) pixel position of polar coordinates (theta, rho)."""
        r = rho * float(self.radius(theta))
        return self.cx + self.ax * r * math.cos(theta), self.cy + self.ay * r * math.sin(theta)


def paint_skin_and_lesion(rng: np.random.Generator, les: Lesion) -> tuple[np.ndarray, np.ndarray]:
    """Skin (tone, blotches, grain) with the lesion's brown gradient on top.

    Returns:
        image float32 [H, W, 3] (RGB, unclipped) and the lesion mask uint8 [H, W].
    """
    height, width = les.rho.shape
    skin = rng.uniform([200, 145, 120], [240, 195, 170]).astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    image[:] = skin
    image += smooth_noise(rng, height, width, min(height, width) / 4)[..., None] * [10, 9, 9]
    image += rng.normal(0, 3.0, (height, width, 1)).astype(np.float32)

    lesion = (les.rho < 1.0).astype(np.uint8)
    inner = rng.uniform([90, 55, 30], [130, 85, 50]).astype(np.float32)
    outer = rng.uniform([160, 110, 75], [190, 135, 95]).astype(np.float32)
    depth = np.clip(1.0 - les.rho, 0, 1) ** 0.7 + 0.15 * smooth_noise(rng, height, width, 20)
    tone = outer + (inner - outer) * np.clip(depth, 0, 1)[..., None]
    alpha = np.clip((1.0 - les.rho) / 0.08, 0, 1)
    image += (tone.astype(np.float32) - image) * alpha[..., None]
    return image, lesion


def draw_network(image, region, xx, yy, rng, *, period, width, negative: bool) -> None:
    """A warped reticular grid over `region`: dark lines on lighter holes (pigment network), or
    light lines on a dark background (`negative`). `xx`, `yy` are the pixels' coordinates (as
    `Lesion.xx`, `Lesion.yy`, or crops of them with crops of `image` and `region`); `period`
    and `width` are in pixels."""
    angle = rng.uniform(0, np.pi)
    h, w = region.shape
    warp = 0.55 if negative else 0.4
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / period
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period
    u = u + warp * smooth_noise(rng, h, w, 3 * period)
    v = v + warp * smooth_noise(rng, h, w, 3 * period)
    lines = grid_lines(u, v, period, width)
    # A soft inner edge keeps the texture from looking pasted on; the mask stays the region.
    soft = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 1.5) * region
    if negative:
        blend(image, rng.uniform([70, 42, 30], [100, 62, 45]), 0.85 * soft)
        blend(image, rng.uniform([200, 165, 140], [225, 190, 165]), 0.9 * lines * soft)
    else:
        blend(image, image * 1.1, 0.5 * soft)  # lighter holes between the lines
        blend(image, rng.uniform([45, 25, 15], [75, 45, 30]), 0.9 * lines * soft)


def draw_streak_lines(image, les, rng, centre, width, *, spacing, thickness) -> None:
    """Dark radial lines across the lesion border, in the angular sector (centre, width)."""
    r_mean = 0.5 * (les.ax + les.ay)
    n = max(3, int(width * r_mean / spacing))
    color = tuple(float(c) for c in rng.uniform([40, 22, 15], [70, 42, 30]))
    for t in np.linspace(centre - width / 2, centre + width / 2, n):
        t = t + rng.uniform(-0.02, 0.02)
        p0 = les.point(t, rng.uniform(0.7, 0.78))
        p1 = les.point(t + rng.uniform(-0.03, 0.03), rng.uniform(1.04, 1.12))
        pts = [tuple(int(round(c * 16)) for c in p) for p in (p0, p1)]
        cv2.line(image, pts[0], pts[1], color, thickness, cv2.LINE_AA, shift=4)


def draw_dots(image, mask, centres, radii, color, *, halo: bool) -> None:
    """Round dots of `radii` pixels at `centres` (x, y); the mask gets each dot plus 1.5 px.

    `halo` adds a darker rim (milia-like cysts)."""
    for (cx, cy), r in zip(centres, radii, strict=True):
        c = (int(round(cx * 16)), int(round(cy * 16)))
        if halo:
            cv2.circle(
                image,
                c,
                int(round((r + 1.5) * 16)),
                tuple(float(v) for v in np.asarray(color) * 0.85),
                -1,
                cv2.LINE_AA,
                shift=4,
            )
        cv2.circle(
            image, c, int(round(r * 16)), tuple(float(v) for v in color), -1, cv2.LINE_AA, shift=4
        )
        cv2.circle(mask, c, int(round((r + 1.5) * 16)), 1, -1, cv2.LINE_8, shift=4)


def draw_hairs(image: np.ndarray, rng: np.random.Generator) -> None:
    """Up to five thin dark curved hairs, each starting on an image edge."""
    h, w = image.shape[:2]
    for _ in range(min(5, rng.poisson(1.5))):
        p = rng.uniform([0, 0], [w, h], (3, 2))
        axis = int(rng.integers(2))
        p[0, axis] = 0 if rng.random() < 0.5 else (w, h)[axis]  # start on an image edge
        t = np.linspace(0, 1, 40)[:, None]
        curve = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]
        color = tuple(float(c) for c in rng.uniform([20, 15, 10], [60, 45, 35]))
        cv2.polylines(
            image,
            [np.round(curve * 16).astype(np.int32)],
            False,
            color,
            int(rng.integers(1, 3)),
            cv2.LINE_AA,
            shift=4,
        )


def finish(image: np.ndarray, les: Lesion, rng: np.random.Generator) -> np.ndarray:
    """Hairs, the dermoscope's dark circular vignette on some images, optical blur, and
    quantisation: float32 [H, W, 3] in, uint8 out."""
    height, width = image.shape[:2]
    draw_hairs(image, rng)
    if rng.random() < VIGNETTE_PROB:
        radius = 0.5 * math.hypot(height, width) * rng.uniform(0.8, 0.95)
        dist = np.hypot(les.xx - width / 2, les.yy - height / 2)
        fade = np.clip((dist - radius) / 6.0 + 0.5, 0, 1)
        image *= 1.0 - 0.93 * fade[..., None]
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
