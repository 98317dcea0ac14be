"""``PatchSampler``: one training patch per (epoch, index), read from the cache region it needs.

Per sample, everything random comes from the generator ``augment.sample_rng(seed, epoch,
index)``, in this order: the case (uniform, or weighted: one draw), then
``compose.sample(rng, shape, **case_context)`` (each spatial transform in list order, then
each intensity transform). The sampler owns no sampling rule of its own: the crop does
(``augment.RandomCrop(size, foreground=1/3)`` for nnU-Net's class-balanced foreground
oversampling, ``augment.TargetCrop(..., p_target=...)`` for DSB2017), fed by the case
context: ``fg_points`` and ``fg_classes`` (the cache's stored foreground sample),
``targets`` (the case's rows of the ``targets`` mapping) and ``case``.

``Compose.plan`` then gives the sample's pull map; the sampler maps the corners of the
output patch through it, and their bounding box plus the interpolation taps (floor and
floor + 1), clipped to the volume, is the only region read from the cache. The same plan,
shifted by the region's start (``Plan.offset_by``), runs on the region, so the patch
equals the one augmenting the whole volume would give: taps outside the volume read the
``Compose``'s ``cval`` / ``label_cval`` either way, which is why no padding value is needed
(the region is clipped, never padded). A whole volume is never read for a patch.

    sampler = PatchSampler(VolumeCache(root), augment.Compose([
        augment.RandomCrop(128, foreground=1 / 3), augment.RandomAffine(15, (0.85, 1.25)),
        augment.RandomFlip(p=0.5), augment.Window(-200, 250)], cval=-1024))
    out = sampler.sample(epoch=0, index=7)   # image (1, 128, 128, 128) float32, label uint8
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

import augment
from augment import matrices as mx
from augment.target_crop import TargetCropParams
from loaders.cache import VolumeCache
from loaders.errors import DataWarning

__all__ = ["Draw", "PatchSampler", "clip_box", "footprint"]

Box = tuple[tuple[int, int, int], tuple[int, int, int]]
# Corner coordinates within this distance of an integer count as that integer, so that the
# floor taken here can never disagree with the kernel's by float rounding.
_EPS = 1e-6
# the corners of the unit cube, in the order meshgrid(..., indexing="ij") gives them
_CORNERS = np.array([[z, y, x] for z in (0, 1) for y in (0, 1) for x in (0, 1)], dtype=np.int64)


def footprint(matrix: ArrayLike, out_shape: Sequence[int], *, margin: int = 0) -> Box:
    """The source box an output patch samples from, before clipping to the volume.

    Args:
        matrix: ``(3, 4)`` / ``(4, 4)`` pull map (output index -> source index).
        out_shape: ``(d, h, w)`` of the output patch.
        margin: extra voxels on every side.

    Returns:
        ``(start, stop)``, half-open integer triples: every trilinear tap (floor(c) and
        floor(c) + 1 per axis) and every nearest tap of every output voxel lies inside.
    """
    corners = _CORNERS * (np.asarray(out_shape, dtype=np.int64) - 1)
    src = mx.apply_points(matrix, corners)
    lo = np.floor(src.min(axis=0) - _EPS).astype(np.int64) - int(margin)
    hi = np.floor(src.max(axis=0) + _EPS).astype(np.int64) + 2 + int(margin)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)  # type: ignore[return-value]


def clip_box(box: Box, shape: Sequence[int]) -> Box:
    """``box`` intersected with the volume; never empty: where they do not meet, one voxel
    of the volume that no tap touches (the output is then all fill values)."""
    lo = [min(max(a, 0), n - 1) for a, n in zip(box[0], shape, strict=True)]
    hi = [max(min(b, n), a + 1) for a, b, n in zip(lo, box[1], shape, strict=True)]
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


@dataclass(frozen=True)
class Draw:
    """What one sample drew: its case, the Compose parameters, their plan on the whole
    volume, and the target (z, y, x, d) its TargetCrop was centred on (None otherwise)."""

    case: str
    params: augment.ComposeParams
    plan: augment.Plan
    target: NDArray[np.float64] | None = None


class PatchSampler:
    """Patches of a ``VolumeCache`` augmented by a ``Compose``, one per (epoch, index).

    The Compose's first spatial transform must be the crop: a ``RandomCrop`` (its size is
    the patch size; its ``foreground`` or ``centre_sampler`` places it) or a ``TargetCrop``
    (DSB2017; its ``p_target`` decides how often it centres on one of the case's
    ``targets``). Pickles small (the cache pickles as its root), so spawned workers can
    take it.

    Args:
        cache: the volume cache.
        compose: the augmentation; its ``cval`` is in the cache's units (use the air value,
            e.g. -1024 HU, for CT, since regions near the border read it outside the volume).
        cases: case ids to draw from (default: all of the cache's).
        case_weights: relative probability of each case (a sequence aligned with ``cases``
            or a mapping id -> weight); default uniform.
        targets: for a TargetCrop, case id -> ``(N, 4)`` targets ``(z, y, x, diameter)`` in
            voxels (the ``targets`` context of that case).
        seed: run seed; sample ``index`` of ``epoch`` uses ``sample_rng(seed, epoch, index)``.
        margin: voxels read beyond the interpolation footprint on every side.
        foreground: removed; the crop owns it (``augment.RandomCrop(size, foreground=1/3)``,
            ``augment.TargetCrop(..., p_target=...)``). Giving it raises TypeError.

    Raises:
        ValueError: no crop first in the Compose, unknown cases, bad weights, patch shapes
            that vary by case.
        TypeError: ``foreground`` given.

    Warns:
        DataWarning: cases smaller than the crop along some axis (their patches are
            partly padding); the cache build does not know the patch size.
    """

    def __init__(
        self,
        cache: VolumeCache,
        compose: augment.Compose,
        *,
        cases: Sequence[str] | None = None,
        case_weights: Sequence[float] | Mapping[str, float] | None = None,
        targets: Mapping[str, ArrayLike] | None = None,
        seed: int = 0,
        margin: int = 0,
        foreground: float | None = None,
    ) -> None:
        if foreground is not None:
            raise TypeError(
                f"PatchSampler(foreground={foreground!r}) is gone: the crop owns its centre "
                "strategy; give it to the crop instead, e.g. "
                f"augment.RandomCrop(size, foreground={foreground!r}), or "
                f"augment.TargetCrop(..., p_target={foreground!r})"
            )
        if not isinstance(compose, augment.Compose):
            raise TypeError(f"compose must be an augment.Compose, got {type(compose).__name__}")
        self.cache = cache
        self.compose = compose
        self.cases = tuple(cache.cases if cases is None else cases)
        if not self.cases:
            raise ValueError(f"no cases to sample from (cache {cache.root} has {len(cache.cases)})")
        missing = [c for c in self.cases if c not in cache]
        if missing:
            raise ValueError(f"cases not in the cache at {cache.root}: {missing[:5]}")
        self.weights = _weights(case_weights, self.cases)
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        self.seed = int(seed)
        if int(margin) < 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.margin = int(margin)
        crop = compose.spatial[0] if compose.spatial else None
        if not isinstance(crop, (augment.RandomCrop, augment.TargetCrop)):
            raise ValueError(
                "PatchSampler needs a RandomCrop or TargetCrop as the first spatial transform "
                f"of the Compose (the patch is a crop of the source), got {compose!r}"
            )
        self.crop = crop
        self.targets = {k: _targets(v, k) for k, v in (targets or {}).items()}
        shapes = {compose.out_shape(cache.shape(c)) for c in self.cases}
        if len(shapes) != 1:
            raise ValueError(f"the patch shape depends on the case: {sorted(shapes)}")
        self.patch_shape: tuple[int, int, int] = shapes.pop()
        crop_shape = self.crop.out_shape(cache.shape(self.cases[0]))
        small = [
            f"{c} {cache.shape(c)}"
            for c in self.cases
            if any(n < k for n, k in zip(cache.shape(c), crop_shape, strict=True))
        ]
        if small:
            warnings.warn(
                f"{len(small)} of {len(self.cases)} cases of the cache at {cache.root} are "
                f"smaller than the crop (z, y, x) {tuple(crop_shape)} along some axis: "
                f"{', '.join(small[:5])}{', ...' if len(small) > 5 else ''}; their patches "
                "are padded with the Compose's cval / label_cval there (a smaller "
                "patch_size or a finer cache spacing avoids it)",
                DataWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return f"PatchSampler({len(self.cases)} cases, {self.compose!r}, seed={self.seed})"

    # -- drawing ------------------------------------------------------------------------
    def context(self, case: str) -> dict[str, Any]:
        """The per-case sampling context: ``case``, ``fg_points`` ``(N, 3)`` and
        ``fg_classes`` ``(N,)`` (the cache's stored foreground sample) and, for cases in
        the ``targets`` mapping, ``targets`` ``(N, 4)``."""
        info = self.cache.info(case)
        ctx: dict[str, Any] = {
            "case": case,
            "fg_points": info.fg_indices,
            "fg_classes": info.fg_classes,
        }
        if case in self.targets:
            ctx["targets"] = self.targets[case]
        return ctx

    def draw(self, epoch: int, index: int) -> Draw:
        """The case, the Compose parameters and their plan of sample ``index`` of ``epoch``
        (no I/O beyond the cache's small per-case metadata). Draw order from the sample's
        generator: the case, then ``compose.sample`` (its transforms in list order)."""
        rng = augment.sample_rng(self.seed, epoch, index)
        if self.weights is not None:
            case = self.cases[int(rng.choice(len(self.cases), p=self.weights))]
        else:
            case = self.cases[int(rng.integers(len(self.cases)))]
        params = self.compose.sample(rng, self.cache.shape(case), **self.context(case))
        crop = params.spatial[0]
        target = None
        if isinstance(crop, TargetCropParams) and not np.isnan(crop.target[0]).any():
            target = crop.target[0]
        return Draw(case=case, params=params, plan=self.compose.plan(params), target=target)

    def region(self, case: str, params: augment.ComposeParams | augment.Plan) -> Box:
        """The cache box (clipped to the volume) that the patch of ``params`` (or of its
        plan on the whole volume) reads."""
        plan = params if isinstance(params, augment.Plan) else self.compose.plan(params)
        reach = int(np.ceil(plan.reach[0].max()))  # an elastic displacement's extra reach
        box = footprint(plan.matrices[0], self.patch_shape, margin=self.margin + reach)
        return clip_box(box, self.cache.shape(case))

    def taps(self, plan: augment.Plan) -> tuple[NDArray[np.float64], tuple[int, ...], float]:
        """``(matrix, patch shape, margin)`` of the patch of ``plan`` (on the whole volume),
        as ``VolumeCache.read_region(taps=)`` takes it: chunks of the region's box that no
        tap of the patch reaches (the box's corners, for a rotated patch) are not read."""
        reach = float(np.ceil(plan.reach[0].max()))
        return plan.matrices[0], tuple(self.patch_shape), float(self.margin) + reach

    # -- reading and augmenting ---------------------------------------------------------
    def _read(
        self,
        d: Draw,
        out_image: NDArray[Any] | None,
        out_label: NDArray[np.uint8] | None,
    ) -> tuple[NDArray[Any], NDArray[np.uint8], tuple[int, int, int]]:
        """The image and label of the region ``d``'s plan reads, ``(rd, rh, rw)`` each (in
        the flat buffers when they are given and large enough), and the region's start."""
        start, stop = self.region(d.case, d.plan)
        shape = tuple(b - a for a, b in zip(start, stop, strict=True))
        taps = self.taps(d.plan)
        n = int(np.prod(shape))
        fits = out_image is not None and out_label is not None
        fits = fits and min(out_image.size, out_label.size) >= n  # type: ignore[union-attr]
        fits = fits and out_image.dtype == self.cache.info(d.case).dtype  # type: ignore[union-attr]
        image = self.cache.read_region(
            d.case,
            (start, stop),
            out=out_image[:n].reshape(shape) if fits else None,  # type: ignore[index]
            taps=taps,
        )
        label = out_label[:n].reshape(shape) if fits else np.empty(shape, np.uint8)  # type: ignore[index]
        if self.cache.has_label(d.case):
            self.cache.read_region(d.case, (start, stop), array="label", out=label, taps=taps)
        else:
            label[...] = 0
        return image, label, start

    def sample_region(
        self,
        epoch: int,
        index: int,
        *,
        out_image: NDArray[Any] | None = None,
        out_label: NDArray[np.uint8] | None = None,
    ) -> dict[str, Any]:
        """The raw cache region of a sample, for augmentation elsewhere (GPU feeding).

        Args:
            out_image, out_label: optional flat buffers (the cache's image dtype, uint8);
                a region that fits is read into their first voxels (e.g. shared memory),
                a larger one into new arrays.

        Returns:
            ``{"image": (1, rd, rh, rw) cache dtype (int16 for CT), "label": (1, rd, rh, rw)
            uint8, "params": ComposeParams, "offset": (3,) int64 region start in the volume,
            "in_shape": (3,) int64 volume shape, "case": id, "target": (4,) or None}``. Run
            the Compose on it with ``params=``, ``offset=`` and ``in_shape=`` (numpy, or
            batched torch tensors); the result is :meth:`sample`'s.
        """
        d = self.draw(epoch, index)
        image, label, start = self._read(d, out_image, out_label)
        return {
            "image": image[None],
            "label": label[None],
            "params": d.params,
            "offset": np.asarray(start, np.int64),
            "in_shape": np.asarray(self.cache.shape(d.case), np.int64),
            "case": d.case,
            "target": d.target,
        }

    def sample(
        self,
        epoch: int,
        index: int,
        *,
        out_image: NDArray[np.float32] | None = None,
        out_label: NDArray[np.uint8] | None = None,
    ) -> dict[str, Any]:
        """Sample ``index`` of ``epoch``: draw and plan it, read its region, run the plan
        (shifted to the region) on it.

        Args:
            out_image, out_label: optional ``(1, d, h, w)`` float32 / uint8 arrays the patch
                is written into (e.g. shared memory), instead of new arrays.

        Returns:
            ``{"image": (1, d, h, w) float32, "label": (1, d, h, w) uint8, "case": id,
            "params": ComposeParams, "offset": (3,) region start}``, plus the Compose's
            ``"target"`` (in patch coordinates) and ``"coord"`` where a TargetCrop gives
            them.
        """
        d = self.draw(epoch, index)
        image, label, start = self._read(d, None, None)
        options: dict[str, Any] = {}
        if out_image is not None:
            options["out_image"] = out_image
        if out_label is not None:
            options["out_label"] = out_label
        out = self.compose.execute(
            d.plan.offset_by(start), image=image[None], label=label[None], **options
        )
        out["case"] = d.case
        out["offset"] = np.asarray(start, np.int64)
        return out


def _weights(
    weights: Sequence[float] | Mapping[str, float] | None, cases: tuple[str, ...]
) -> NDArray[np.float64] | None:
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(cases)
        if unknown:
            raise ValueError(f"case_weights names cases that are not sampled: {sorted(unknown)}")
        w = np.array([float(weights.get(c, 0.0)) for c in cases])
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(cases),):
            raise ValueError(
                f"case_weights needs one weight per case ({len(cases)}), got shape {w.shape}"
            )
    if not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"case_weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


def _targets(value: ArrayLike, case: str) -> NDArray[np.float64]:
    t = np.asarray(value, dtype=np.float64).reshape(-1, 4) if np.size(value) else np.zeros((0, 4))
    if not np.isfinite(t).all():
        raise ValueError(f"targets of case {case!r} must be finite (z, y, x, d) rows, got {t}")
    return t
