"""The toy world's analytic checker: what is in a picture, decided by code.

- background: the most common palette color of the border pixels
- object(s): pixels far from the background color; one object, or for scenes of several
  objects side by side the largest components left to right (a blob split along x where
  objects touch)
- object color: the nearest palette color to the object pixels' median
- shape: the template (rendered by the generator itself) with the best IoU against the
  object mask, searched over sizes and positions around the mask's bounding box
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from persres.toy import world

_PALETTE = np.array([world.PALETTE[c] for c in world.COLORS], dtype=np.float32)  # (C, 3)


def nearest_color(rgb: np.ndarray) -> str:
    return world.COLORS[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


@functools.lru_cache(maxsize=100_000)
def _template(shape: str, cx: int, cy: int, size: int) -> np.ndarray:
    """The generator's own mask; geometry in half pixels."""
    return np.asarray(world.shape_mask(shape, cx / 2, cy / 2, size / 2)) > 0


def background_color(img: np.ndarray) -> str:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (4*side, 3)
    names = [nearest_color(p) for p in border]
    return max(set(names), key=names.count)


def object_mask(img: np.ndarray, background: str, threshold: float = 80.0) -> np.ndarray:
    """Pixels far from the background color, without the 1-pixel frame (objects never touch the
    border in this world; decoded samples often carry edge artifacts there)."""
    bg = np.array(world.PALETTE[background], dtype=np.float32)
    mask = np.sqrt(((img - bg) ** 2).sum(-1)) > threshold  # (H, W) bool
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = False
    return mask


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool mask, largest first."""
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append(comp)
    return sorted(out, key=lambda c: -int(c.sum()))


def classify_shape(mask: np.ndarray) -> str | None:
    """The best-IoU shape template for a (H, W) bool mask, or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 6:
        return None
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0)
    best, best_iou = None, -1.0
    # half-pixel grid for centers and sizes (the templates take float geometry)
    cx0, cy0 = int(x0 + x1), int(y0 + y1)
    for shape in world.SHAPES:
        for size in range(max(4, int(side * 2) - 4), int(side * 2 * 1.25) + 3):
            for dx in (-2, -1, 0, 1, 2):
                for dy in (-2, -1, 0, 1, 2):
                    t = _template(shape, cx0 + dx, cy0 + dy, size)
                    inter = np.logical_and(t, mask).sum()
                    iou = inter / max(np.logical_or(t, mask).sum(), 1)
                    if iou > best_iou:
                        best, best_iou = shape, iou
    return best


@dataclass(frozen=True)
class Reading:
    background: str
    colors: tuple[str | None, ...]
    shapes: tuple[str | None, ...]


def segment(image: Image.Image, objects: int = 1) -> tuple[np.ndarray, str, list[np.ndarray]]:
    """(pixels (H, W, 3), background color, one mask per object, left to right)."""
    img = np.asarray(image.convert("RGB").resize((world.SIZE, world.SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    bg = background_color(img)
    mask = object_mask(img, bg)
    comps = components(mask)
    if objects == 1:
        return img, bg, [comps[0] if comps else mask]
    big = [c for c in comps[:objects] if c.sum() >= 6]  # the largest components, or the mask split along x
    return img, bg, sorted(big, key=lambda c: np.nonzero(c)[1].mean()) if len(big) == objects else split_along_x(mask, objects)


def read(image: Image.Image, objects: int = 1) -> Reading:
    img, bg, parts = segment(image, objects)
    colors, shapes = [], []
    for part in parts:
        if part.sum() < 6:
            colors.append(None)
            shapes.append(None)
            continue
        core = _erode(part)  # edge pixels blend into the background
        colors.append(nearest_color(np.median(img[core if core.sum() >= 6 else part], axis=0)))
        shapes.append(classify_shape(part))
    return Reading(bg, tuple(colors), tuple(shapes))


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def split_along_x(mask: np.ndarray, objects: int = 2) -> list[np.ndarray]:
    """Objects side by side, left to right: k-means on the mask pixels' x coordinates (they may touch)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < objects:
        return [mask, *(np.zeros_like(mask) for _ in range(objects - 1))]
    centers = np.linspace(float(xs.min()), float(xs.max()), objects)
    for _ in range(10):
        label = np.abs(xs[:, None] - centers[None, :]).argmin(1)  # (N,)
        moved = np.array([xs[label == k].mean() if (label == k).any() else centers[k] for k in range(objects)])
        if np.allclose(moved, centers):
            break
        centers = moved
    parts = []
    for k in range(objects):
        part = np.zeros_like(mask)
        part[ys[label == k], xs[label == k]] = True
        parts.append(part)
    return parts


def check(image: Image.Image, scene: world.Scene) -> dict[str, bool]:
    """Per-attribute correctness of a picture against the scene its caption describes."""
    reading = read(image, len(scene.objects))
    out = {"background": reading.background == scene.background}
    out["color"] = all(c == o.color for c, o in zip(reading.colors, scene.objects))
    out["shape"] = all(s == o.shape for s, o in zip(reading.shapes, scene.objects))
    return out
