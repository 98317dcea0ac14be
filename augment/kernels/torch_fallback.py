"""Batched torch resampling: the fallback for CPU tensors and machines without Triton.

Pure functions of tensors that take checked values as they are (the checks live in
:mod:`augment.backends.torch`): matrices ``(B, 3, 4)`` float64 and programs
``(B, n_ops, 4)`` float64 as numpy arrays, sources of one dtype and device. The semantics
are those of the numba kernel (:mod:`augment.kernels.cpu`), which is the reference:

- ``matrices[b]`` is a ``(3, 4)`` pull map from OUTPUT voxel index ``(z, y, x, 1)`` to the
  INPUT index of sample ``b``; voxel centres sit at integers.
- Trilinear image: every one of the eight taps that falls outside the source reads
  ``cval`` (scipy.ndimage ``mode="grid-constant"``); the lerp chain is the kernel's, in
  float32, with float64 coordinates computed in the kernel's order, so interior voxels
  are bit-identical to the numba path.
- Nearest (labels, or ``image_order=0``): ``floor(c + 0.5)``; outside reads the constant.
- The intensity program (:mod:`augment.kernels.program`) runs on every image voxel after
  interpolation, padding included, in float64, its noise a counter-based hash of
  (seed, flat index within the sample's ``(C, d, h, w)`` output).

Sources are either one ``(B, C, D, H, W)`` tensor or a list of ``(C, D_b, H_b, W_b)``
tensors of different sizes; both are addressed as one flat buffer with per-sample element
offsets (a list is concatenated: this is the fallback, the Triton kernel reads the tensors
in place).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch
from numpy.typing import NDArray

from augment import matrices as mx
from augment.kernels import bspline
from augment.kernels.program import AFFINE, CLIP, GAMMA, HASH_M1, HASH_M2, MASK32, NOISE, TWO_PI

Sources: TypeAlias = "torch.Tensor | Sequence[torch.Tensor]"

# Output voxels resampled at once; bounds the temporaries (about 100 bytes per voxel).
CHUNK_VOXELS = 1 << 24


@dataclass(frozen=True)
class Packed:
    """Sources addressed as one flat buffer: sample ``b`` channel ``c`` voxel ``(z, y, x)``
    lives at ``flat[offsets[b] + ((c * D_b + z) * H_b + y) * W_b + x]``."""

    flat: torch.Tensor
    offsets: torch.Tensor  # (B,) int64, on flat's device
    shapes: NDArray[np.int64]  # (B, 3) (D, H, W) of each sample
    channels: int

    @property
    def batch(self) -> int:
        return int(self.shapes.shape[0])


def pack(sources: Sources) -> Packed:
    """Address a ``(B, C, D, H, W)`` tensor (no copy) or a list of ``(C, D, H, W)`` tensors
    (concatenated) as one flat buffer.

    Shape:
        sources: ``(B, C, D, H, W)`` or B tensors ``(C, D_b, H_b, W_b)`` of one dtype.
    """
    if isinstance(sources, torch.Tensor):
        x = sources.contiguous()
        b, c = int(x.shape[0]), int(x.shape[1])
        vol = int(np.prod(x.shape[1:]))
        offsets = torch.arange(b, dtype=torch.int64, device=x.device) * vol
        shapes = np.tile(np.asarray(x.shape[2:], dtype=np.int64), (b, 1))
        return Packed(flat=x.reshape(-1), offsets=offsets, shapes=shapes, channels=c)
    parts = [s.contiguous() for s in sources]
    sizes = np.asarray([p.numel() for p in parts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    flat = torch.cat([p.reshape(-1) for p in parts])
    return Packed(
        flat=flat,
        offsets=torch.from_numpy(starts).to(flat.device),
        shapes=np.asarray([p.shape[1:] for p in parts], dtype=np.int64).reshape(-1, 3),
        channels=int(parts[0].shape[0]),
    )


# -- the intensity program -----------------------------------------------------------------
def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``(x * m) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_M1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_M2)
    return x ^ (x >> 16)


def noise(seed: torch.Tensor | int, flat_index: torch.Tensor) -> torch.Tensor:
    """Standard normals of the counter-based generator, as ``program.noise_reference``.

    Args:
        seed: integer seed(s), broadcastable against ``flat_index``.
        flat_index: int64 voxel counters.

    Returns:
        float64 normals, the broadcast shape of ``seed`` and ``flat_index``.
    """
    key = torch.as_tensor(seed, dtype=torch.int64, device=flat_index.device) & MASK32
    even = flat_index & (MASK32 - 1)  # the first counter of the voxel's pair, mod 2**32
    b1 = _mix32(_mix32(even) ^ key)
    b2 = _mix32(_mix32(even + 1) ^ key)
    u1 = ((b1 >> 8).to(torch.float64) + 1.0) * (1.0 / 16777216.0)
    u2 = (b2 >> 8).to(torch.float64) * (1.0 / 16777216.0)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = TWO_PI * u2
    return radius * torch.where((flat_index & 1) == 1, torch.sin(angle), torch.cos(angle))


def run_program(x: torch.Tensor, programs: NDArray[np.float64]) -> torch.Tensor:
    """Apply each sample's fused intensity program to its resampled image.

    Computed in float64 like the numba kernel; opcodes are read on the host, so the
    programs cost no device synchronisation.

    Args:
        x: resampled images.
        programs: ``(B, n_ops, 4)`` float64.

    Returns:
        A new tensor of ``x``'s dtype (float32 for integer ``x``).

    Shape:
        x: ``(B, C, d, h, w)``.
    """
    batch = int(x.shape[0])
    prog = programs
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    if prog.shape[1] == 0:
        return x.to(out_dtype, copy=True)
    y = x.to(torch.float64)
    dev = x.device
    view = (batch,) + (1,) * (x.dim() - 1)
    flat_index: torch.Tensor | None = None
    for k in range(prog.shape[1]):
        codes, a, b, c = (prog[:, k, j] for j in range(4))
        ta = torch.from_numpy(a.copy()).to(dev).view(view)
        tb = torch.from_numpy(b.copy()).to(dev).view(view)
        tc = torch.from_numpy(c.copy()).to(dev).view(view)
        for code in np.unique(codes):
            sel = codes == code
            if code == AFFINE:
                new = y * ta + tb
            elif code == CLIP:
                new = torch.minimum(torch.maximum(y, ta), tb)
            elif code == GAMMA:
                t = torch.clamp((y - tb) / (tc - tb), 0.0, 1.0)
                new = tb + (tc - tb) * t**ta
            elif code == NOISE:
                if flat_index is None:
                    numel = int(np.prod(x.shape[1:]))
                    flat_index = torch.arange(numel, dtype=torch.int64, device=dev)
                    flat_index = flat_index.view((1, *x.shape[1:]))
                rows = np.flatnonzero(sel)
                idx = torch.from_numpy(rows).to(dev)
                seeds = torch.from_numpy(b[rows].astype(np.int64)).to(dev).view(-1, *view[1:])
                y[idx] = y[idx] + ta[idx] * noise(seeds, flat_index)
                continue
            else:
                raise ValueError(f"unknown intensity opcode {code}")
            if sel.all():
                y = new
            else:
                mask = torch.from_numpy(sel).to(dev).view(view)
                y = torch.where(mask, new, y)
    return y.to(out_dtype)


# -- resampling ---------------------------------------------------------------------------
@dataclass
class _Grid:
    """Per-chunk index arithmetic shared by image and label."""

    coords: list[torch.Tensor]  # 3 x (b, d, h, w) float64 source coordinates
    sizes: torch.Tensor  # (b, 3) int64 source (D, H, W)
    offsets: torch.Tensor  # (b,) int64


def _coords(m: torch.Tensor, out_shape: tuple[int, int, int]) -> list[torch.Tensor]:
    d, h, w = out_shape
    z = torch.arange(d, dtype=torch.float64, device=m.device).view(1, d, 1, 1)
    y = torch.arange(h, dtype=torch.float64, device=m.device).view(1, 1, h, 1)
    x = torch.arange(w, dtype=torch.float64, device=m.device).view(1, 1, 1, w)
    out = []
    for k in range(3):
        col = [m[:, k, j].view(-1, 1, 1, 1) for j in range(4)]
        # the numba kernel's order: (m0 * z + m1 * y) + m3, then + m2 * x
        base = col[0] * z + col[1] * y + col[3]
        out.append(base + col[2] * x)
    return out


def spline_matrix(n: int, g: int, device: torch.device) -> torch.Tensor:
    """``(n, g)`` float64: row ``i`` holds output index ``i``'s four B-spline weights at
    its control points (:func:`augment.kernels.bspline.basis`), zeros elsewhere."""
    j, w = bspline.basis(n, g)
    dense = np.zeros((n, g))
    rows = np.arange(n)
    for k in range(4):
        dense[rows, j - 1 + k] = w[:, k]
    return torch.from_numpy(dense).to(device)


def displacement(field: torch.Tensor, out_shape: tuple[int, int, int]) -> list[torch.Tensor]:
    """The displacement of every output voxel, per axis: the B-spline of ``field``
    evaluated separably (three small matrix products, float64).

    Shape:
        field: ``(b, 3, gz, gy, gx)`` -> 3 x ``(b, d, h, w)``.
    """
    d, h, w = out_shape
    gz, gy, gx = (int(g) for g in field.shape[2:])
    bz = spline_matrix(d, gz, field.device)
    by = spline_matrix(h, gy, field.device)
    bx = spline_matrix(w, gx, field.device)
    t = torch.einsum("xk,bcijk->bcijx", bx, field)
    t = torch.einsum("yj,bcijx->bciyx", by, t)
    t = torch.einsum("zi,bciyx->bczyx", bz, t)
    return [t[:, k] for k in range(3)]


def _bview(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def _nearest(src: Packed, grid: _Grid, fill: float | int, out_dtype: torch.dtype) -> torch.Tensor:
    """Nearest-neighbour samples ``(b, C, d, h, w)`` of ``src`` at ``grid``."""
    r = [torch.floor(c + 0.5).to(torch.int64) for c in grid.coords]
    nz, ny, nx = (_bview(grid.sizes[:, k]) for k in range(3))
    valid = (r[0] >= 0) & (r[1] >= 0) & (r[2] >= 0) & (r[0] < nz) & (r[1] < ny) & (r[2] < nx)
    svol = nz * ny * nx
    idx = _bview(grid.offsets) + (r[0] * ny + r[1]) * nx + r[2]
    idx = torch.where(valid, idx, torch.zeros((), dtype=torch.int64, device=idx.device))
    chans = []
    for c in range(src.channels):
        v = src.flat.take(idx + c * svol).to(out_dtype)
        chans.append(torch.where(valid, v, torch.tensor(fill, dtype=out_dtype, device=v.device)))
    return torch.stack(chans, dim=1)


def _trilinear_taps(
    grid: _Grid,
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Weights (float32) and, per tap in the kernel's order, (flat index, inside mask)."""
    g = [torch.floor(c) for c in grid.coords]
    w = [(c - f).to(torch.float32) for c, f in zip(grid.coords, g, strict=True)]
    i = [f.to(torch.int64) for f in g]
    nz, ny, nx = (_bview(grid.sizes[:, k]) for k in range(3))
    vz = [(i[0] + t >= 0) & (i[0] + t < nz) for t in (0, 1)]
    vy = [(i[1] + t >= 0) & (i[1] + t < ny) for t in (0, 1)]
    vx = [(i[2] + t >= 0) & (i[2] + t < nx) for t in (0, 1)]
    base = _bview(grid.offsets) + (i[0] * ny + i[1]) * nx + i[2]
    zero = torch.zeros((), dtype=torch.int64, device=base.device)
    taps = []
    for tz in (0, 1):
        for ty in (0, 1):
            for tx in (0, 1):
                valid = vz[tz] & vy[ty] & vx[tx]
                idx = base + (tz * ny + ty) * nx + tx
                taps.append((torch.where(valid, idx, zero), valid))
    return w, taps


def _lerp8(a: list[torch.Tensor], w: list[torch.Tensor]) -> torch.Tensor:
    """The numba kernel's lerp chain over taps ordered (z, y, x) with x fastest."""
    wz, wy, wx = w
    b0 = a[0] + (a[1] - a[0]) * wx
    b1 = a[2] + (a[3] - a[2]) * wx
    b2 = a[4] + (a[5] - a[4]) * wx
    b3 = a[6] + (a[7] - a[6]) * wx
    c0 = b0 + (b1 - b0) * wy
    c1 = b2 + (b3 - b2) * wy
    return c0 + (c1 - c0) * wz


def _trilinear(src: Packed, grid: _Grid, cval: float) -> torch.Tensor:
    w, taps = _trilinear_taps(grid)
    svol = _bview(grid.sizes.prod(dim=1))
    fill = torch.tensor(cval, dtype=torch.float32, device=src.flat.device)
    chans = []
    for c in range(src.channels):
        a = [
            torch.where(valid, src.flat.take(idx + c * svol).to(torch.float32), fill)
            for idx, valid in taps
        ]
        chans.append(_lerp8(a, w))
    return torch.stack(chans, dim=1)


def _onehot_linear(src: Packed, grid: _Grid, fill: int, classes: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of each class indicator (outside counts as ``fill``), then the
    first class of highest weight, as ``backends.numpy.onehot_linear_numpy``."""
    w, taps = _trilinear_taps(grid)
    svol = _bview(grid.sizes.prod(dim=1))
    chans = []
    for c in range(src.channels):
        vals = [
            torch.where(
                valid,
                src.flat.take(idx + c * svol).to(torch.int64),
                torch.full((), fill, dtype=torch.int64, device=idx.device),
            )
            for idx, valid in taps
        ]
        best = torch.full(vals[0].shape, -1.0, dtype=torch.float32, device=vals[0].device)
        arg = torch.zeros(vals[0].shape, dtype=torch.int64, device=vals[0].device)
        for k in range(int(classes.numel())):
            a = [(v == classes[k]).to(torch.float32) for v in vals]
            wk = _lerp8(a, w)
            better = wk > best
            best = torch.where(better, wk, best)
            arg = torch.where(better, k, arg)
        chans.append(classes[arg])
    return torch.stack(chans, dim=1)


def warp_batch(
    images: Sources | None,
    labels: Sources | None,
    matrices: NDArray[np.float64],
    out_shape: tuple[int, int, int],
    *,
    image_order: int = 1,
    cval: float = 0.0,
    label_cval: float = 0,
    programs: NDArray[np.float64] | None = None,
    out_dtype: torch.dtype = torch.float32,
    label_mode: str = "nearest",
    classes: torch.Tensor | None = None,
    field: NDArray[np.float64] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Resample a batch of images and labels, one pull map per sample, with torch ops.

    Args:
        images: ``(B, C, D, H, W)`` tensor, a list of ``(C, D_b, H_b, W_b)`` tensors, or None.
        labels: the same layout (integer dtype, the images' shapes), or None.
        matrices: ``(B, 3, 4)`` (or ``(B, 4, 4)``) float64 pull maps.
        out_shape: ``(d, h, w)``.
        image_order: 1 trilinear, 0 nearest.
        cval: image value outside the source.  label_cval: label value outside.
        programs: fused intensity programs ``(B, n_ops, 4)`` float64, or None.
        out_dtype: image output dtype (float32 or bfloat16; computed in float32).
        label_mode: ``"nearest"`` or ``"linear_onehot"``.
        classes: sorted int64 classes, needed for ``linear_onehot``.
        field: ``(B, 3, gz, gy, gx)`` float64 control vectors of a displacement added to
            every coordinate (see :class:`augment.plan.Plan`), or None.

    Returns:
        ``(image, label)``: ``(B, C, d, h, w)`` in ``out_dtype`` and ``(B, L, d, h, w)`` in
        the label dtype; None where the input was None.
    """
    img = pack(images) if images is not None else None
    lab = pack(labels) if labels is not None else None
    ref = img if img is not None else lab
    assert ref is not None
    dev = ref.flat.device
    m_all = torch.as_tensor(mx.to_3x4(matrices), device=dev)
    batch = ref.batch
    prog = np.zeros((batch, 0, 4)) if programs is None else programs
    sizes = torch.from_numpy(ref.shapes.copy()).to(dev)

    vox = int(np.prod(out_shape))
    step = max(1, CHUNK_VOXELS // max(vox, 1))
    out_img, out_lab = [], []
    for s0 in range(0, batch, step):
        sl = slice(s0, min(batch, s0 + step))
        coords = _coords(m_all[sl], out_shape)
        if field is not None:
            # the numba kernel's order: the affine coordinate, then + the displacement
            shift = displacement(
                torch.from_numpy(np.ascontiguousarray(field[sl])).to(dev), out_shape
            )
            coords = [c + s for c, s in zip(coords, shift, strict=True)]
        if img is not None:
            grid = _Grid(coords, sizes[sl], img.offsets[sl])
            if image_order == 1:
                v = _trilinear(img, grid, cval)
            else:
                v = _nearest(img, grid, cval, torch.float32)
            if prog.shape[1]:
                v = run_program(v, prog[sl])
            out_img.append(v.to(out_dtype))
        if lab is not None:
            grid = _Grid(coords, sizes[sl], lab.offsets[sl])
            if label_mode == "linear_onehot":
                assert classes is not None
                out_lab.append(
                    _onehot_linear(lab, grid, int(label_cval), classes.to(dev)).to(lab.flat.dtype)
                )
            else:
                lval = torch.tensor(label_cval).to(lab.flat.dtype).item()
                out_lab.append(_nearest(lab, grid, lval, lab.flat.dtype))
    return (
        torch.cat(out_img) if img is not None else None,
        torch.cat(out_lab) if lab is not None else None,
    )


# -- exact index maps -----------------------------------------------------------------------
def exact_copy(
    src: torch.Tensor,
    em: mx.ExactMap,
    out_shape: tuple[int, int, int],
    fill: float | int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Exact index copy of ``src`` under the signed permutation ``em`` into ``out``
    (converting to ``out``'s dtype), as ``augment.backends.numpy.exact_copy`` does for numpy.

    Shape:
        src: ``(C, D, H, W)``; out: ``(C, d, h, w)``.
    """
    order = [0, 0, 0]  # output axis j reads input axis order[j]
    for k in range(3):
        order[em.axis[k]] = k
    view = src.permute(0, *(1 + k for k in order))
    dst_sl, src_sl = [slice(None)], [slice(None)]
    flips = []
    for j, k in enumerate(order):
        n_in = int(src.shape[1 + k])
        off = em.offset[k]
        if em.sign[k] < 0:
            off = n_in - 1 - off
        lo, hi = max(0, -off), min(out_shape[j], n_in - off)  # output p reads view p + off
        if hi <= lo:
            out.fill_(fill)
            return out
        dst_sl.append(slice(lo, hi))
        if em.sign[k] < 0:
            # slice first, then flip the (smaller) slab: flipped p is original n_in - 1 - p
            src_sl.append(slice(n_in - hi - off, n_in - lo - off))
            flips.append(1 + j)
        else:
            src_sl.append(slice(lo + off, hi + off))
    if any(s.start > 0 or s.stop < n for s, n in zip(dst_sl[1:], out_shape, strict=True)):
        out.fill_(fill)
    part = view[tuple(src_sl)]
    out[tuple(dst_sl)] = part.flip(flips) if flips else part
    return out
