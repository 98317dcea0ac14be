"""Backend kernels. Pure functions writing into explicit outputs; no validation here.

- :mod:`augment.kernels.cpu`: numba (parallel CPU) fused resampling.
- :mod:`augment.kernels.cpu2d`: numba slice-by-slice resampling (``augment.slices``).
- :mod:`augment.kernels.program`: the fused intensity program shared by all backends, and
  its batch padding.
- :mod:`augment.kernels.torch_fallback`: batched pure-torch resampling (CPU tensors, or
  CUDA without Triton).
- :mod:`augment.kernels.triton_warp`: the CUDA Triton kernel, imported lazily.

The checks live in the callers: :mod:`augment._validate` and the backends.
"""
