"""Synthetic abdominal CT phantoms: the built-in default dataset.

A phantom case is an int16 CT-like volume in Hounsfield units with a uint8 label (0
background, 1 liver, 2 tumour; "liver" in the LiTS sense is ``label >= 1``). The anatomy is
drawn in millimetres in patient LPS coordinates (x to the patient's left, y posterior, z
superior), so one seed gives the same anatomy at every resolution; the grid only decides
how finely it is sampled. What is in it:

- a superelliptic body outline with subcutaneous fat, a muscle wall and an abdominal
  cavity whose texture mixes soft tissue, visceral fat, enhancing bowel (liver-like
  intensities) and a few gas pockets;
- the liver: a smooth union of three deformed ellipsoids (right lobe, left lobe, caudate)
  under the diaphragm dome, with bright intrahepatic vessels (labelled liver, as in LiTS)
  and 0-3 hypodense tumours (label 2);
- distractors with liver-like or brighter intensities: spleen, kidneys (cortex and sinus),
  aorta and inferior vena cava, lung bases above the dome, the spine (vertebral bodies,
  discs, canal, posterior arch, spinous process), ribs and the scanner table;
- partial-volume blur and correlated noise, and the constant padding value outside the
  reconstruction circle that real scanners write.

Spacing follows real CT: the in-plane field of view is 360-410 mm and the scan covers
240-320 mm along z, so the 512 x 512 ``"large"`` preset has 0.70-0.80 mm pixels and
1.2-1.6 mm slices, and the smaller presets are the same anatomy sampled like a
downsampled CT (anisotropy z : in-plane between about 1.5 and 4).

``write_msd_dataset`` writes cases as NIfTI files in the Medical Segmentation Decathlon
layout so that the default training run reads them through the same path as real data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from augment.workers import spawn_executor
from loaders.cases import Case
from loaders.errors import DatasetError
from loaders.volume import write_array

__all__ = ["SIZES", "generate_case", "write_msd_dataset"]

SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (32, 64, 64),
    "small": (48, 96, 96),
    "default": (80, 160, 160),
    "large": (200, 512, 512),
}
"""Named grid shapes (z, y, x): tiny for tests, default for the training run, large for
benchmarks (a full-resolution abdominal CT)."""

PHANTOM_VERSION = 1
"""Bumped whenever the generator's output for a given seed changes."""

AIR_HU = -1000.0
PAD_HU = -1024
LABELS = {"0": "background", "1": "liver", "2": "tumour"}

SeedLike = int | np.random.SeedSequence | np.random.Generator


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates in mm (relative to the volume centre) of one box."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    slices: tuple[slice, slice, slice]

    @property
    def zz(self) -> np.ndarray:
        return self.z[:, None, None]

    @property
    def yy(self) -> np.ndarray:
        return self.y[None, :, None]

    @property
    def xx(self) -> np.ndarray:
        return self.x[None, None, :]


class _Canvas:
    """The volume being painted: image (float32 HU), label and coordinate axes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        self.axes = [
            ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s)
            for n, s in zip(shape, spacing, strict=True)
        ]
        self.image = np.full(shape, AIR_HU, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> _Grid | None:
        """The grid of voxels whose centres lie in the mm box [lo, hi] (None if empty)."""
        sl = []
        for ax, a, b in zip(self.axes, lo, hi, strict=True):
            i0 = int(np.searchsorted(ax, a, side="left"))
            i1 = int(np.searchsorted(ax, b, side="right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        z, y, x = (ax[s] for ax, s in zip(self.axes, sl, strict=True))
        return _Grid(z, y, x, (sl[0], sl[1], sl[2]))

    def paint(self, g: _Grid, mask: np.ndarray, value: float | np.ndarray, *, label: int) -> None:
        """Set the image to ``value`` where ``mask``; the label becomes ``label`` there.

        ``label=-1`` leaves the label alone (textures inside an organ).
        """
        img = self.image[g.slices]
        np.copyto(img, np.asarray(value, dtype=np.float32), where=mask)
        if label >= 0:
            np.copyto(self.label[g.slices], np.uint8(label), where=mask)


def _smooth_field(
    rng: np.random.Generator,
    g: _Grid,
    lo: Sequence[float],
    hi: Sequence[float],
    cell: float,
) -> np.ndarray:
    """A smooth random field (about unit standard deviation) evaluated on ``g``.

    The field is a sum of Gaussian bumps on a regular control grid over the mm box
    [lo, hi] with ``cell`` mm between control points and N(0, 1) weights; the weights
    depend only on the box and ``cell``, never on the voxel grid, so the same draw gives
    the same field at any resolution. Separable, so evaluation is three small matmuls.
    """
    centres = [np.arange(a - cell, b + 1.5 * cell, cell) for a, b in zip(lo, hi, strict=True)]
    coef = rng.standard_normal(tuple(len(c) for c in centres)).astype(np.float32)
    coef *= np.float32(1.0 / math.pi**0.75)  # sum of squared unit-width bumps ~ pi^1.5
    bases = [
        np.exp(-0.5 * ((pts[:, None] - c[None, :]) / cell) ** 2).astype(np.float32)
        for pts, c in zip((g.z, g.y, g.x), centres, strict=True)
    ]
    t = np.tensordot(coef, bases[2], axes=([2], [1]))  # (cz, cy, X)
    t = np.tensordot(bases[1], t, axes=([1], [1]))  # (Y, cz, X)
    t = np.tensordot(bases[0], t, axes=([1], [1]))  # (Z, Y, X)
    return t


def _ellipsoid_level(
    g: _Grid,
    centre: Sequence[float],
    radii: Sequence[float],
    angle: float = 0.0,
) -> np.ndarray:
    """((p - c) / r)^2 summed, with the (y, x) axes rotated by ``angle`` about z first."""
    dz = (g.zz - centre[0]) / radii[0]
    dy0 = g.yy - centre[1]
    dx0 = g.xx - centre[2]
    ca, sa = math.cos(angle), math.sin(angle)
    dy = (ca * dy0 - sa * dx0) / radii[1]
    dx = (sa * dy0 + ca * dx0) / radii[2]
    return (dz * dz + (dy * dy + dx * dx)).astype(np.float32)


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float = 0.4) -> np.ndarray:
    """Polynomial smooth minimum (a union of level sets without a crease), into ``a``."""
    h = np.abs(a - b)
    np.subtract(k, h, out=h)
    np.maximum(h, 0.0, out=h)
    h *= h
    h *= np.float32(0.25 / k)
    np.minimum(a, b, out=a)
    a -= h
    return a


def _bbox(centre: Sequence[float], radii: Sequence[float], pad: float = 1.3):
    r = max(radii[1], radii[2]) * pad
    lo = (centre[0] - radii[0] * pad, centre[1] - r, centre[2] - r)
    hi = (centre[0] + radii[0] * pad, centre[1] + r, centre[2] + r)
    return lo, hi


def _seed_sequence(seed: SeedLike) -> np.random.SeedSequence:
    """A SeedSequence from an int, a SeedSequence, or entropy drawn from a Generator."""
    if isinstance(seed, np.random.Generator):
        return np.random.SeedSequence(seed.integers(0, 2**63, size=4).tolist())
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        return np.random.SeedSequence(int(seed))
    raise TypeError(f"seed must be a non-negative int, SeedSequence or Generator, got {seed!r}")


def _resolve_shape(shape: tuple[int, int, int] | str) -> tuple[int, int, int]:
    if isinstance(shape, str):
        if shape not in SIZES:
            raise ValueError(f"unknown phantom size {shape!r}; expected one of {sorted(SIZES)}")
        return SIZES[shape]
    out = tuple(int(n) for n in shape)
    if len(out) != 3 or min(out) < 8:
        raise ValueError(f"phantom shape must be 3 sizes >= 8 (z, y, x), got {shape!r}")
    return out


def generate_case(
    seed: SeedLike,
    *,
    shape: tuple[int, int, int] | str = "default",
    spacing: tuple[float, float, float] | None = None,
    tumours: bool = True,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Generate one synthetic abdominal CT case.

    Args:
        seed: an int or ``SeedSequence`` (the output is a pure function of it and the
            other arguments), or a ``Generator`` (entropy is drawn from it). Three
            independent streams are spawned from it (geometry, spacing, noise), so fixing
            ``spacing`` does not change the anatomy.
        shape: grid shape (z, y, x) or a preset name from ``SIZES``.
        spacing: voxel spacing (z, y, x) in mm; by default drawn like a real scan covering
            a 360-410 mm field of view in-plane and 240-320 mm along z.
        tumours: draw 0-3 liver tumours (label 2); without, the label is 0/1.

    Returns:
        ``(image, label, spacing)``: image int16 (z, y, x) in HU (-1024 outside the
        reconstruction circle), label uint8 of the same shape, spacing (z, y, x) in mm.
    """
    shp = _resolve_shape(shape)
    ss = _seed_sequence(seed)
    # the children ss.spawn(3) would give, without advancing a caller's SeedSequence
    geom_ss, spacing_ss, noise_ss = (
        np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, k), pool_size=ss.pool_size)
        for k in range(3)
    )
    rng = np.random.default_rng(geom_ss)
    if spacing is None:
        srng = np.random.default_rng(spacing_ss)
        fov = srng.uniform(360.0, 410.0)
        z_extent = srng.uniform(240.0, 320.0)
        spc = (z_extent / shp[0], fov / shp[1], fov / shp[2])
    else:
        spc = tuple(float(s) for s in spacing)  # type: ignore[assignment]
        if len(spc) != 3 or not all(math.isfinite(s) and s > 0 for s in spc):
            raise ValueError(f"spacing must be 3 positive numbers (z, y, x) in mm, got {spacing!r}")
    cv = _Canvas(shp, spc)
    _draw_anatomy(cv, rng, tumours=tumours)

    nrng = np.random.default_rng(noise_ss)
    noise_sd = nrng.uniform(8.0, 18.0)
    # Gaussian partial-volume blur of about half a voxel; the noise is added before it so
    # that it comes out spatially correlated like CT noise. The blur of sigma (0.5, 0.6,
    # 0.6) voxels leaves white noise with about 0.42x its standard deviation.
    # Uniform noise (4x cheaper to draw than normal here) becomes near-Gaussian once the
    # blur sums 27 neighbours.
    img = cv.image
    noise = nrng.random(shp, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(noise_sd / 0.42 * math.sqrt(12.0))
    img += noise
    _blur(img, (0.5, 0.6, 0.6), tmp=noise)
    np.clip(img, PAD_HU, 3071, out=img)
    np.rint(img, out=img)
    out = img.astype(np.int16)
    fov_r = 0.5 * min(shp[1] * spc[1], shp[2] * spc[2])
    outside = cv.axes[1][:, None] ** 2 + cv.axes[2][None, :] ** 2 > fov_r**2
    out[:, outside] = PAD_HU
    cv.label[:, outside] = 0
    return out, cv.label, spc


def _draw_anatomy(cv: _Canvas, rng: np.random.Generator, *, tumours: bool) -> None:
    """Paint the body, organs and distractors onto ``cv``; every draw comes from ``rng``."""
    u = rng.uniform
    # --- body outline: a superellipse whose size breathes slowly along z
    ax, ay = u(140, 175), u(100, 125)
    cx, cy = u(-8, 8), u(-10, 10)
    power = u(2.2, 2.8)
    fat_mm, muscle_mm = u(8, 28), u(8, 14)
    body_phase = u(0, 2 * math.pi)
    fat_hu, muscle_hu, cavity_hu = u(-110, -85), u(40, 60), u(20, 35)
    bowel_hu = u(85, 125)  # enhancing bowel wall / stomach: liver-like on purpose
    # --- diaphragm dome: the liver and spleen lie below it, lung bases above
    z_dome = u(55, 95)
    # --- liver
    liver_r = (u(70, 95), u(75, 95), u(70, 90))  # (z, y, x) radii of the right lobe
    liver_c = (z_dome - liver_r[0] * u(0.75, 0.9), cy - u(0.0, 0.2) * ay, cx - u(0.35, 0.5) * ax)
    liver_angle = u(-0.25, 0.25)
    left_c = (liver_c[0] + u(0, 20), liver_c[1] - u(20, 40), liver_c[2] + u(70, 100))
    left_r = (u(35, 50), u(35, 50), u(45, 65))
    caud_c = (liver_c[0], liver_c[1] + u(20, 35), liver_c[2] + u(30, 45))
    caud_r = (u(25, 35), u(15, 22), u(15, 22))
    liver_hu = u(95, 130)
    vessel_hu = liver_hu + u(40, 80)
    tumour_params = [(u(0, 1), u(0, 2 * math.pi), u(-1, 1), u(6, 25), u(25, 60)) for _ in range(3)]
    n_tumours = int(rng.integers(0, 4)) if tumours else 0
    # --- spleen, kidneys, great vessels, spine, ribs, gas, table
    spleen_c = (z_dome - u(50, 80), cy + u(0.1, 0.3) * ay, cx + u(0.45, 0.6) * ax)
    spleen_r = (u(45, 65), u(20, 30), u(30, 45))
    spleen_angle, spleen_hu = u(0.3, 0.7), u(100, 130)
    spine_y = cy + ay * u(0.45, 0.55)
    spine_r = u(17, 22)
    kidney_z = liver_c[0] - u(30, 60)
    kidneys = [
        (
            (kidney_z + u(-15, 15), spine_y - u(0, 10), cx + side * u(55, 75)),
            (u(45, 60), u(22, 28), u(25, 32)),
            side * u(0.2, 0.5),
        )
        for side in (-1.0, 1.0)
    ]
    cortex_hu, sinus_hu = u(150, 200), u(-60, -20)
    aorta = (cx + u(10, 25), spine_y - spine_r - u(12, 20), u(9, 13), u(150, 250))
    ivc = (cx - u(15, 30), spine_y - spine_r - u(10, 18), u(9, 13))
    ivc_hu = aorta[3] - u(30, 80)
    vert_period, vert_phase = u(28, 34), u(0, 34)
    cortical_hu, cancellous_hu = u(600, 900), u(180, 280)
    rib_period, rib_phase, rib_hu = u(24, 30), u(0, 30), u(500, 800)
    gas = [(u(0, 1), u(-0.2, 0.6), u(-0.7, 0.3), u(-60, 20), u(6, 18)) for _ in range(8)]
    table_gap, table_hu = u(10, 30), u(-350, -200)
    lung_hu = u(-880, -820)

    zc = cv.axes[0]
    scale_z = (1.0 + 0.06 * np.sin(zc / 120.0 + body_phase)).astype(np.float32)
    full = cv.box((-1e9,) * 3, (1e9,) * 3)
    assert full is not None
    # Normalised superelliptic radius in-plane (1 on the skin at scale 1); a voxel lies
    # ``depth`` mm below the skin when r2d < scale_z - depth / ay. Only 2D float maps and
    # 3D booleans are made at full size.
    r2d = (np.abs((full.yy[0] - cy) / ay) ** power + np.abs((full.xx[0] - cx) / ax) ** power) ** (
        1.0 / power
    )

    def deeper(g: _Grid, depth_mm: float) -> np.ndarray:
        thr = scale_z[g.slices[0]] - np.float32(depth_mm / ay)
        return r2d[g.slices[1], g.slices[2]][None] < thr[:, None, None]

    def dome_below(g: _Grid, margin: float) -> np.ndarray:
        dome = (
            z_dome
            - 8.0 * np.tanh((g.xx - cx) / 40.0)
            - 45.0 * ((g.xx - cx) / ax) ** 2
            - 30.0 * ((g.yy - cy) / ay) ** 2
        )
        return g.zz < dome - margin

    wall = fat_mm + muscle_mm
    cv.paint(full, deeper(full, 0.0), fat_hu, label=0)
    cv.paint(full, deeper(full, fat_mm), muscle_hu, label=0)
    cavity = deeper(full, wall)
    # cavity texture: soft tissue with visceral fat where the field is low and enhancing
    # bowel where it is high
    texture = _smooth_field(rng, full, (-200, -200, -220), (200, 200, 220), cell=22.0)
    # lung bases above the dome (not in the mediastinum); only the top slabs can hold lung
    lg = cv.box((z_dome - 90.0, -1e9, -1e9), (1e9, 1e9, 1e9))
    lung_val = None
    if lg is not None:
        heart_y = cy - 0.15 * ay
        mediastinum = ((lg.xx - cx) / 55.0) ** 2 + ((lg.yy - heart_y) / (0.55 * ay)) ** 2 < 1.0
        lung = cavity[lg.slices] & ~dome_below(lg, 0.0) & ~mediastinum
        lung_val = (lung, lung_hu + 40.0 * texture[lg.slices])
    visceral_fat = texture < -0.8
    bowel = texture > 0.8
    texture *= 25.0
    texture += cavity_hu
    np.copyto(texture, np.float32(fat_hu + 10.0), where=visceral_fat)
    np.copyto(texture, np.float32(bowel_hu), where=bowel)
    del visceral_fat, bowel
    cv.paint(full, cavity, texture, label=0)
    del texture
    if lg is not None and lung_val is not None:
        cv.paint(lg, lung_val[0], lung_val[1], label=0)
    # table under the patient
    tg = cv.box((-1e9, cy + ay + table_gap, -0.9 * ax), (1e9, cy + ay + table_gap + 12, 0.9 * ax))
    if tg is not None:
        cv.paint(tg, np.ones(1, bool), table_hu, label=0)

    # kidneys: enhanced cortex around a fatty sinus
    for centre, radii, angle in kidneys:
        lo, hi = _bbox(centre, radii)
        g = cv.box(lo, hi)
        if g is None:
            continue
        lvl = _ellipsoid_level(g, centre, radii, angle)
        cv.paint(g, lvl < 1.0, cortex_hu, label=0)
        cv.paint(g, lvl < 0.3, sinus_hu, label=0)

    # spleen
    lo, hi = _bbox(spleen_c, spleen_r)
    g = cv.box(lo, hi)
    if g is not None:
        lvl = _ellipsoid_level(g, spleen_c, spleen_r, spleen_angle)
        lvl += 0.15 * _smooth_field(rng, g, lo, hi, cell=40.0)
        cv.paint(g, (lvl < 1.0) & dome_below(g, 3.0), spleen_hu, label=0)

    # liver: smooth union of three deformed ellipsoids under the dome, inside the cavity
    lz, ly, lx = liver_c
    lo = (lz - 1.3 * liver_r[0], ly - 1.4 * liver_r[1], lx - 1.4 * liver_r[2])
    hi = (lz + 1.3 * liver_r[0], ly + 1.4 * liver_r[1], left_c[2] + 1.4 * left_r[2])
    g = cv.box(lo, hi)
    if g is not None:
        union = _smooth_min(
            _smooth_min(
                _ellipsoid_level(g, liver_c, liver_r, liver_angle),
                _ellipsoid_level(g, left_c, left_r, liver_angle),
            ),
            _ellipsoid_level(g, caud_c, caud_r, liver_angle),
        )
        union += 0.25 * _smooth_field(rng, g, lo, hi, cell=60.0)
        sl = g.slices
        liver = (union < 1.0) & dome_below(g, 3.0) & cavity[sl]
        del union
        f1 = _smooth_field(rng, g, lo, hi, cell=25.0)
        f2 = _smooth_field(rng, g, lo, hi, cell=25.0)
        vessels = liver & (np.abs(f1) < 0.07) & (np.abs(f2) < 0.35)
        cv.paint(g, liver, liver_hu + 6.0 * f2, label=1)
        cv.paint(g, vessels, vessel_hu, label=-1)
        for frac, phi, zf, radius, drop in tumour_params[:n_tumours]:
            # a point inside the right lobe
            rr = 0.65 * frac ** (1 / 3)
            tc = (
                liver_c[0] + zf * rr * liver_r[0] * 0.7,
                liver_c[1] + math.sin(phi) * rr * liver_r[1],
                liver_c[2] + math.cos(phi) * rr * liver_r[2],
            )
            tr = (radius, radius * u(0.8, 1.2), radius * u(0.8, 1.2))
            tlo, thi = _bbox(tc, tr)
            tg2 = cv.box(tlo, thi)
            if tg2 is None:
                continue
            tl = _ellipsoid_level(tg2, tc, tr, u(0, math.pi))
            tl += 0.2 * _smooth_field(rng, tg2, tlo, thi, cell=max(radius, 8.0))
            tmask = (tl < 1.0) & (cv.label[tg2.slices] >= 1)
            cv.paint(tg2, tmask, liver_hu - drop, label=2)

    # aorta and inferior vena cava: vertical tubes that drift slowly
    for vx, vy, vr, vhu in (aorta, (*ivc, ivc_hu)):
        g = cv.box((-1e9, vy - vr - 10, vx - vr - 10), (1e9, vy + vr + 10, vx + vr + 10))
        if g is None:
            continue
        drift = 5.0 * np.sin(g.zz / 150.0)
        tube = (g.yy - vy) ** 2 + (g.xx - vx - drift) ** 2 < vr**2
        cv.paint(g, tube & cavity[g.slices], vhu, label=0)

    # spine: vertebral bodies (cortical shell, cancellous core) and discs, canal, arch
    g = cv.box((-1e9, spine_y - spine_r - 5, cx - 45), (1e9, spine_y + spine_r + 50, cx + 45))
    if g is not None:
        disc = np.mod(g.zz - vert_phase, vert_period) < 6.0
        rb = np.sqrt(((g.yy - spine_y) / spine_r) ** 2 + ((g.xx - cx) / (spine_r * 1.15)) ** 2)
        cv.paint(g, (rb < 1.0) & ~disc, cortical_hu, label=0)
        cv.paint(g, (rb < 0.85) & ~disc, cancellous_hu, label=0)
        cv.paint(g, (rb < 1.0) & disc, 90.0, label=0)
        canal_y = spine_y + spine_r + 9.0
        rc = np.sqrt((g.yy - canal_y) ** 2 + (g.xx - cx) ** 2)
        arch = (rc > 8.0) & (rc < 14.0) & (g.yy > spine_y + spine_r - 2)
        spinous = (np.abs(g.xx - cx) < 4.0) & (g.yy > canal_y + 12) & (g.yy < canal_y + 38)
        cv.paint(g, (arch | spinous) & ~disc & deeper(g, 0.0), cortical_hu * 0.8, label=0)
        cv.paint(g, rc < 8.0, 20.0, label=0)

    # ribs: bands just inside the muscle wall, sloping down anteriorly, above the kidneys
    g = cv.box((kidney_z, -1e9, -1e9), (1e9, 1e9, 1e9))
    if g is not None:
        rib_zone = deeper(g, wall - 2.0) & ~deeper(g, wall + 8.0)
        rib_z = np.mod(g.zz - 15.0 * (g.yy - cy) / ay - rib_phase, rib_period)
        lateral = ~((np.abs(g.xx - cx) < 50.0) & (g.yy < cy)) & ~(
            (np.abs(g.xx - cx) < 35.0) & (g.yy > cy)
        )
        cv.paint(g, rib_zone & (rib_z < 9.0) & lateral, rib_hu, label=0)

    # bowel gas pockets in the anterior left cavity (never inside the liver)
    for present, fy, fx, gz, gr in gas:
        if present < 0.4:
            continue
        gc = (gz, cy + fy * ay, cx + fx * ax + 0.4 * ax)
        radii = (gr, gr * 0.8, gr)
        glo, ghi = _bbox(gc, radii)
        gg = cv.box(glo, ghi)
        if gg is None:
            continue
        pocket = (_ellipsoid_level(gg, gc, radii) < 1.0) & cavity[gg.slices]
        pocket &= dome_below(gg, 3.0) & (cv.label[gg.slices] == 0)
        cv.paint(gg, pocket, -900.0, label=0)


def _blur(img: np.ndarray, sigma: Sequence[float], *, tmp: np.ndarray) -> None:
    """Separable Gaussian blur of ``img`` in place (3-tap kernels), in slabs on threads.

    scipy.ndimage releases the GIL, and a 1D filter along one axis is exact when the
    volume is split along another, so the result does not depend on the thread count.
    """
    threads = max(1, min(4, os.cpu_count() or 1))
    src, dst = img, tmp
    with ThreadPoolExecutor(threads) as ex:
        for axis, sd in enumerate(sigma):
            split = 1 if axis == 0 else 0
            bounds = np.linspace(0, img.shape[split], threads + 1).astype(int)

            def run(
                i: int,
                axis: int = axis,
                sd: float = sd,
                split: int = split,
                src: np.ndarray = src,
                dst: np.ndarray = dst,
                bounds: np.ndarray = bounds,
            ) -> None:
                sl = [slice(None)] * 3
                sl[split] = slice(bounds[i], bounds[i + 1])
                ndimage.gaussian_filter1d(
                    src[tuple(sl)],
                    sd,
                    axis=axis,
                    mode="nearest",
                    truncate=2.0,
                    output=dst[tuple(sl)],
                )

            list(ex.map(run, range(threads)))
            src, dst = dst, src
    if src is not img:
        np.copyto(img, src)


def _case_seed(seed: int, split: int, index: int) -> np.random.SeedSequence:
    # Keyed by (split, index) so that case i does not change when n_train/n_test change.
    return np.random.SeedSequence(seed, spawn_key=(split, index))


def _write_one(args: tuple[Path, Path | None, int, int, int, tuple[int, int, int], bool]) -> None:
    image_path, label_path, seed, split, index, shape, tumours = args
    image, label, spacing = generate_case(
        _case_seed(seed, split, index), shape=shape, tumours=tumours
    )
    origin = tuple(-0.5 * (n - 1) * s for n, s in zip(image.shape, spacing, strict=True))
    write_array(image, image_path, spacing=spacing, origin=origin)
    if label_path is not None:
        write_array(label, label_path, spacing=spacing, origin=origin)


def write_msd_dataset(
    root: str | os.PathLike[str],
    *,
    n_train: int,
    n_test: int = 0,
    seed: int = 0,
    size: str | tuple[int, int, int] = "default",
    tumours: bool = True,
    workers: int = 1,
    overwrite: bool = False,
) -> list[Case]:
    """Write a phantom dataset in the Medical Segmentation Decathlon layout.

    ``root/dataset.json`` (written last), ``root/imagesTr/phantom_NNN.nii.gz``,
    ``root/labelsTr/phantom_NNN.nii.gz`` and, for ``n_test > 0``, unlabelled
    ``root/imagesTs/phantom_test_NNN.nii.gz``. The configuration is recorded under the
    ``"phantom"`` key of dataset.json; calling again with the same configuration on a
    complete dataset returns at once without regenerating anything.

    Args:
        root: dataset folder (created).
        n_train: number of labelled training cases (>= 1).
        n_test: number of unlabelled test cases.
        seed: base seed; case i of a split is generated from ``SeedSequence(seed,
            spawn_key=(split, i))``, so it does not depend on the counts or ``workers``.
        size: a ``SIZES`` preset or a (z, y, x) shape.
        tumours: include liver tumours (label 2).
        workers: processes used to generate cases (spawn start method).
        overwrite: replace a dataset at ``root`` written with another configuration
            (otherwise that raises ``DatasetError``).

    Returns:
        The training cases, as ``loaders.msd_cases(root)`` returns them.
    """
    from loaders.layouts import msd_cases

    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train=}, {n_test=}")
    shape = _resolve_shape(size)
    root = Path(root)
    config = {
        "version": PHANTOM_VERSION,
        "seed": int(seed),
        "shape": list(shape),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "tumours": bool(tumours),
    }
    ds_json = root / "dataset.json"
    if ds_json.exists():
        try:
            existing = json.loads(ds_json.read_text()).get("phantom")
        except (json.JSONDecodeError, AttributeError):
            existing = None
        if existing == config:
            return msd_cases(root)
        if not overwrite:
            raise DatasetError(
                ds_json,
                f"holds a different dataset (phantom config {existing!r}, requested "
                f"{config!r}); pass overwrite=True to replace it",
            )
        ds_json.unlink()
    jobs: list[tuple[Path, Path | None, int, int, int, tuple[int, int, int], bool]] = []
    training, test = [], []
    for i in range(n_train):
        name = f"phantom_{i:03d}.nii.gz"
        jobs.append(
            (root / "imagesTr" / name, root / "labelsTr" / name, seed, 0, i, shape, tumours)
        )
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    for i in range(n_test):
        name = f"phantom_test_{i:03d}.nii.gz"
        jobs.append((root / "imagesTs" / name, None, seed, 1, i, shape, tumours))
        test.append(f"./imagesTs/{name}")
    for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if n_test else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(jobs) > 1:
        with spawn_executor(min(workers, len(jobs))) as ex:
            list(ex.map(_write_one, jobs))
    else:
        for job in jobs:
            _write_one(job)
    meta = {
        "name": "Phantom",
        "description": "Synthetic abdominal CT (loaders.phantom): liver 1, tumour 2",
        "reference": "generated",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LABELS,
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": test,
        "phantom": config,
    }
    tmp = ds_json.with_name(f".dataset.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, ds_json)
    return msd_cases(root)
