"""Color distance as a person sees it: sRGB to CIE Lab (D65) and the ΔE76 / CIEDE2000 differences.

A palette-nearest label or a coarse RGB histogram says whether a pixel falls in the right bin;
ΔE says how far its color is from the one it should be, in units where about 2.3 is a just
noticeable difference (ΔE76) and 10-20 reads as "a different shade".
"""

from __future__ import annotations

import numpy as np

_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])  # linear sRGB -> XYZ, D65
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65 reference white


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in 0-255 -> (..., 3) CIE Lab (L 0-100)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _WHITE
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e76(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """Euclidean distance in Lab; broadcasts over leading dimensions."""
    return np.sqrt(((np.asarray(lab1) - np.asarray(lab2)) ** 2).sum(-1))


def delta_e2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 (kL = kC = kH = 1; Sharma, Wu and Dalal 2005); broadcasts over leading dimensions."""
    lab1, lab2 = np.broadcast_arrays(np.asarray(lab1, dtype=np.float64), np.asarray(lab2, dtype=np.float64))
    L1, a1, b1 = np.moveaxis(lab1, -1, 0)
    L2, a2, b2 = np.moveaxis(lab2, -1, 0)
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    chroma_zero = (c1p * c2p) == 0

    dLp = L2 - L1
    dCp = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(chroma_zero, 0.0, dh)
    dHp = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2)

    Lp_mean = (L1 + L2) / 2
    Cp_mean = (c1p + c2p) / 2
    h_sum = h1p + h2p
    hp_mean = np.where(np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
    hp_mean = np.where(chroma_zero, h_sum, hp_mean)
    t = (1 - 0.17 * np.cos(np.radians(hp_mean - 30)) + 0.24 * np.cos(np.radians(2 * hp_mean))
         + 0.32 * np.cos(np.radians(3 * hp_mean + 6)) - 0.20 * np.cos(np.radians(4 * hp_mean - 63)))
    d_theta = 30 * np.exp(-(((hp_mean - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(Cp_mean**7 / (Cp_mean**7 + 25.0**7))
    s_l = 1 + 0.015 * (Lp_mean - 50) ** 2 / np.sqrt(20 + (Lp_mean - 50) ** 2)
    s_c = 1 + 0.045 * Cp_mean
    s_h = 1 + 0.015 * Cp_mean * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    return np.sqrt((dLp / s_l) ** 2 + (dCp / s_c) ** 2 + (dHp / s_h) ** 2 + r_t * (dCp / s_c) * (dHp / s_h))


def nearest_delta_e(pixels_lab: np.ndarray, reference_lab: np.ndarray, formula: str = "76") -> np.ndarray:
    """(N, 3), (M, 3) Lab -> (N,): each pixel's ΔE to the nearest reference color."""
    if len(reference_lab) == 0:
        raise ValueError("no reference colors")
    diff = delta_e76 if formula == "76" else delta_e2000
    return diff(pixels_lab[:, None, :], reference_lab[None, :, :]).min(axis=1)
