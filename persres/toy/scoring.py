"""How the toy bench scores an image: the analytic checker's objects, their colors against a
concept's references (histogram identity, CIE Lab ΔE), shape and count (`persres.toy.bench`
runs the bench over these)."""

from __future__ import annotations

from collections.abc import Sequence
import numpy as np
from PIL import Image

from persres.toy import checker, color, world

BINS = 4  # per channel: 64 color bins
MIN_OBJECT_PIXELS = 8  # a component smaller than this is noise, not an object
NEAR_DELTA_E = 20.0  # ΔE76: "the concept's color" up to this distance (about a shade apart)


def color_histogram(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) uint8-range pixels -> normalized (BINS**3,) histogram."""
    if len(pixels) == 0:
        return np.zeros(BINS**3)
    q = np.clip(pixels.astype(np.int64) * BINS // 256, 0, BINS - 1)
    idx = q[:, 0] * BINS * BINS + q[:, 1] * BINS + q[:, 2]
    hist = np.bincount(idx, minlength=BINS**3).astype(np.float64)
    return hist / hist.sum()


def reference_lab(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) object pixels -> (M, 3) their distinct colors in Lab."""
    return color.srgb_to_lab(np.unique(np.round(pixels).astype(np.int64), axis=0))


def object_lab(img: np.ndarray, part: np.ndarray) -> np.ndarray | None:
    """(K, 3) Lab of an object's core pixels (edge pixels blend into the background), or None
    where the checker found no object there."""
    if part.sum() < 6:
        return None
    core = checker._erode(part)
    return color.srgb_to_lab(img[core if core.sum() >= 6 else part])


def lab_fidelity(lab: np.ndarray, ref_lab: np.ndarray) -> dict:
    """Median ΔE76, median CIEDE2000 and share within NEAR_DELTA_E of (K, 3) object colors to the nearest reference color."""
    de76 = color.nearest_delta_e(lab, ref_lab, "76")
    return {"delta_e": float(np.median(de76)), "delta_e2000": float(np.median(color.nearest_delta_e(lab, ref_lab, "2000"))),
            "within_20": float((de76 <= NEAR_DELTA_E).mean())}


def color_fidelity(image: Image.Image, ref_lab: np.ndarray, objects: int = 1, which: int = 0) -> dict:
    """ΔE of one object's core pixels to the nearest reference color (`lab_fidelity`); {} where
    the checker finds no object there."""
    img, _, parts = checker.segment(image, objects)
    lab = object_lab(img, parts[which])
    return {} if lab is None else lab_fidelity(lab, ref_lab)


def shape_match(image: Image.Image, shape: str, objects: int = 1, which: int = 0) -> float:
    """1.0 where the checker reads the object as `shape`."""
    return float(checker.read(image, objects).shapes[which] == shape)


def identity(image: Image.Image, reference_hist: np.ndarray, objects: int = 1, which: int = 0) -> float:
    img, _, parts = checker.segment(image, objects)
    return histogram_identity(color_histogram(img[parts[which]]), reference_hist)


def histogram_identity(hist: np.ndarray, reference_hist: np.ndarray) -> float:
    return float(np.minimum(hist, reference_hist).sum())


def count_objects(image: Image.Image) -> int:
    """How many objects the checker sees: components of the object mask of at least MIN_OBJECT_PIXELS."""
    img = np.asarray(image.convert("RGB").resize((world.SIZE, world.SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    mask = checker.object_mask(img, checker.background_color(img))
    return sum(int(c.sum()) >= MIN_OBJECT_PIXELS for c in checker.components(mask))


def pair_background(*concept_pixels: np.ndarray) -> str:
    """The palette background farthest from every concept's colors (5th percentile distance)."""
    pixels = np.concatenate(concept_pixels).astype(np.float32)

    def margin(color: str) -> float:
        return float(np.percentile(np.sqrt(((pixels - np.array(world.PALETTE[color])) ** 2).sum(-1)), 5))

    return max(world.COLORS, key=margin)


def score_image(image: Image.Image, prompt, ref_hist: np.ndarray, concept=None) -> dict:
    reading = checker.read(image, prompt.objects)
    row = {"identity": identity(image, ref_hist, prompt.objects),
           "drawn": float(count_objects(image) == prompt.objects)}  # a residual that dissolves its object scores 0
    if concept is not None:
        row |= color_fidelity(image, concept.ref_lab, prompt.objects)
        row["shape"] = float(reading.shapes[0] == concept.shape)
    if prompt.background is not None:
        row["background"] = float(reading.background == prompt.background)
    if prompt.added is not None:
        row["added"] = float(reading.colors[1] == prompt.added)
    if prompt.attribute is not None:
        row["attribute"] = float(reading.colors[0] == prompt.attribute)
    return row


def side_suffix(i: int) -> str:
    return "" if i == 0 else f"_{i + 1}"


def score_group(image: Image.Image, concepts: Sequence) -> dict:
    """Several concepts side by side, left to right: all present, and per side (suffix "", "_2",
    "_3") its identity, own minus the other concepts' best, its ΔE to its own concept's colors,
    whether it is nearer its own colors than any other concept's, and its shape."""
    n = len(concepts)
    row = {"both_present": float(count_objects(image) == n)}
    reading = checker.read(image, n)
    img, _, parts = checker.segment(image, n)  # once: every side is scored against every concept
    for i, (own, part) in enumerate(zip(concepts, parts)):
        others = [c for c in concepts if c is not own]
        sfx = side_suffix(i)
        hist = color_histogram(img[part])
        ident = histogram_identity(hist, own.ref_hist)
        row[f"identity{sfx}"] = ident
        row[f"own_minus_other{sfx}"] = ident - max(histogram_identity(hist, o.ref_hist) for o in others)
        lab = object_lab(img, part)
        if lab is not None:
            fid = lab_fidelity(lab, own.ref_lab)
            other_de = min(float(np.median(color.nearest_delta_e(lab, o.ref_lab, "76"))) for o in others)
            row |= {f"{k}{sfx}": v for k, v in fid.items()}
            row[f"nearer_own{sfx}"] = float(fid["delta_e"] < other_de)
            row[f"lab_margin{sfx}"] = other_de - fid["delta_e"]
        row[f"shape{sfx}"] = float(reading.shapes[i] == own.shape)
    return row
