"""Backends: execute a :class:`~augment.plan.Plan` on numpy arrays or torch tensors.

- :mod:`augment.backends.numpy`: one sample, the numba kernels (:mod:`augment.kernels.cpu`).
- :mod:`augment.backends.torch`: batches of tensors, the Triton kernel on CUDA or the
  pure-torch fallback (:mod:`augment.kernels.triton_warp`, :mod:`augment.kernels.torch_fallback`);
  imports torch, so it loads only when a tensor arrives.

Each offers the same small interface to ``Compose``: ``OPTIONS`` (the call's keyword
options it takes), ``inputs(image, label)`` (checked inputs with ``batch``, ``batched``,
``shapes`` ``(B, 3)``, ``has_label`` and ``host_label(b)``, the label as a numpy array for
sampling) and ``execute(plan, inputs, **options)`` (the result dict). Each also holds the
resampling entry points for its array type (``warp_numpy``, ``warp_torch``), which
``augment.affine_warp`` dispatches to.

Nothing is imported here, so that ``import augment`` does not import torch.
"""
