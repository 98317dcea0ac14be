"""``affine_warp``: one resampling pass for numpy arrays (numba) or torch tensors.

The matrix convention is that of :mod:`augment.matrices`: a ``(3, 4)`` (or ``(4, 4)``) pull
map from OUTPUT voxel index to INPUT voxel index, voxel centres at integers. Samples whose
interpolation taps fall outside the source read ``cval`` (scipy.ndimage's
``mode="grid-constant"``). A matrix that is a signed axis permutation with an integer
offset (flips, 90-degree rotations, axis swaps, integer crops) is served by an exact index
copy, bit-identical to ``np.flip`` / ``np.rot90`` / ``np.transpose`` plus slicing.

This module only dispatches: :mod:`augment.backends.numpy` for numpy arrays,
:mod:`augment.backends.torch` (imported on the first tensor) for tensors.
"""

from __future__ import annotations

from typing import Any

from numpy.typing import ArrayLike

from augment._validate import check_order, check_out_shape, is_torch
from augment.backends.numpy import affine_warp_numpy


def affine_warp(
    image: Any,
    matrix: ArrayLike,
    out_shape: ArrayLike,
    order: int = 1,
    cval: float = 0.0,
    out: Any = None,
) -> Any:
    """Resample ``image`` through the pull map ``matrix`` in one pass.

    Args:
        image: numpy ``(D, H, W)`` or ``(C, D, H, W)``; or a torch tensor ``(C, D, H, W)`` /
            ``(B, C, D, H, W)``, or a list of ``(C, D_b, H_b, W_b)`` tensors (see
            :func:`augment.backends.torch.affine_warp_torch`).
        matrix: ``(3, 4)`` / ``(4, 4)`` pull map (output index -> input index), or
            ``(B, 3, 4)`` for a batch of tensors.
        out_shape: ``(d, h, w)`` of the output.
        order: 1 trilinear (output float32), 0 nearest (output keeps the input dtype).
        cval: value for samples outside the input.
        out: optional preallocated output of the right shape and dtype.

    Returns:
        The resampled array (``out`` when given), with the input's channel layout.

    Raises:
        ValueError: wrong ndim, non-finite matrix, non-positive out_shape, bad order.
        TypeError: unsupported dtype or array type.
    """
    order = check_order(order)
    shape = check_out_shape(out_shape)
    if is_torch(image) or (isinstance(image, (list, tuple)) and image and is_torch(image[0])):
        # torch is optional: its backend loads on the first tensor
        from augment.backends.torch import affine_warp_torch

        return affine_warp_torch(image, matrix, shape, order=order, cval=cval, out=out)
    return affine_warp_numpy(image, matrix, shape, order=order, cval=cval, out=out)
