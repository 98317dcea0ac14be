"""Backend kernels. Pure functions writing into explicit outputs; no validation here.

- :mod:`augment.kernels.cpu`: numba (parallel CPU) fused resampling.
- :mod:`augment.kernels.program`: the fused intensity program shared by all backends.
- :mod:`augment.kernels.torch_warp`: batched torch resampling (CPU tensors or CUDA).
- :mod:`augment.kernels.triton_warp`: the CUDA Triton kernel, imported lazily.
"""
