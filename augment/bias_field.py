"""``RandomBiasField``: TorchIO's smooth multiplicative MR bias field.

The field is ``exp(P(z, y, x))`` with ``P`` a polynomial of degree ``order`` in the patch
coordinates normalised to [-1, 1] (``(i - (n - 1) / 2) / ((n - 1) / 2)``, 0 on an axis of
one voxel), the image multiplied by it. The monomials ``u_z^i u_y^j u_x^k`` with
``i + j + k <= order`` are ordered i, then j, then k (TorchIO's order for its first,
second and third array axes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from augment.base import IntensityTransform, Params, as_range, check_probability
from augment.kernels import program as pg

F64 = NDArray[np.float64]
Range = tuple[float, float]


def monomials(order: int) -> list[tuple[int, int, int]]:
    """Exponents ``(i, j, k)`` of ``(z, y, x)`` with ``i + j + k <= order``, in order."""
    return [
        (i, j, k)
        for i in range(order + 1)
        for j in range(order + 1 - i)
        for k in range(order + 1 - i - j)
    ]


def normalised(n: int) -> F64:
    """Coordinates of an axis of ``n`` voxels in [-1, 1] (TorchIO's)."""
    if n == 1:
        return np.zeros(1)
    half = (n - 1) / 2.0
    return (np.arange(n, dtype=np.float64) - half) / half


def log_field_planes(coefficients: F64, order: int, shape: Sequence[int]) -> F64:
    """``(order + 1, d, h)``: ``Q_k(z, y) = sum_{i, j} c_ijk u_z^i u_y^j``, so that the
    log field is ``sum_k Q_k u_x^k``."""
    uz, uy = normalised(int(shape[0])), normalised(int(shape[1]))
    planes = np.zeros((order + 1, len(uz), len(uy)))
    for c, (i, j, k) in zip(coefficients, monomials(order), strict=True):
        planes[k] += c * np.outer(uz**i, uy**j)
    return planes


@dataclass(frozen=True)
class BiasFieldParams(Params):
    active: NDArray[np.bool_]  # (B,)
    coefficients: F64  # (B, n_terms) of the monomials, in :func:`monomials` order


class RandomBiasField(IntensityTransform):
    """Multiply the image by ``exp(P)``, a random smooth polynomial field (TorchIO's
    ``RandomBiasField``), with probability ``p``.

    Cost: after the warp, in float32 over the patch: ``order`` multiply-adds a voxel for
    the polynomial (its (z, y) part is made per plane first), one ``exp`` and one
    multiply per voxel, about six passes over the patch in all: under half the time of
    the W1 pass on a 128^3 patch. (It needs each voxel's position, which the fused
    program's element-wise ops do not have.)

    Args:
        coefficients: each coefficient ~ U(-c, c) for a number ``c``, or U(lo, hi).
        order: degree of the polynomial (TorchIO's default 3: 20 coefficients).
        p: probability that a sample gets a field.
    """

    def __init__(self, coefficients: float | Range = 0.5, order: int = 3, p: float = 0.5) -> None:
        self.coefficients = as_range(coefficients, "coefficients")
        if int(order) != order or order < 0:
            raise ValueError(f"order must be a non-negative integer, got {order!r}")
        self.order = int(order)
        self.p = check_probability(p)

    def sample(self, rng: np.random.Generator) -> BiasFieldParams:
        active = rng.random() < self.p
        coef = rng.uniform(*self.coefficients, len(monomials(self.order)))
        if not active:
            coef = np.zeros_like(coef)
        return BiasFieldParams(active=np.array([active]), coefficients=coef[None])

    def program(self, params: Params, value_range: Range | None) -> F64 | None:
        assert isinstance(params, BiasFieldParams)
        return pg.empty() if not np.any(params.coefficients[0]) else None

    def apply(self, x: Any, params: Params) -> Any:
        assert isinstance(params, BiasFieldParams)
        coef = params.coefficients[0]
        if not np.any(coef):
            return x
        planes = log_field_planes(coef, self.order, x.shape[1:3])
        ux = normalised(int(x.shape[3]))
        if type(x).__module__.startswith("torch"):
            # torch is optional: a tensor here means it is loaded already
            import torch

            q = torch.from_numpy(planes.astype(np.float32)).to(x.device)
            u = torch.from_numpy(ux.astype(np.float32)).to(x.device)
            tlog = q[-1][:, :, None].expand(-1, -1, len(ux)).clone()
            for k in range(self.order - 1, -1, -1):
                tlog.mul_(u).add_(q[k][:, :, None])
            return x * torch.exp(tlog)
        q32 = planes.astype(np.float32)
        u32 = ux.astype(np.float32)
        logf = np.empty((*planes.shape[1:], len(ux)), np.float32)
        logf[...] = q32[-1][:, :, None]
        for k in range(self.order - 1, -1, -1):
            np.multiply(logf, u32, out=logf)
            np.add(logf, q32[k][:, :, None], out=logf)
        np.exp(logf, out=logf)
        return np.multiply(np.asarray(x, dtype=np.float32), logf)

    def out_range(self, value_range: Range | None) -> Range | None:
        return None
