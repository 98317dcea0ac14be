"""Mode safety: train/eval flags that are restored exactly, never reset wholesale.

The bug this module exists for (seed notes, see DESIGN.md): while the adversary trained
against a segnet that had to stay in eval mode, a test routine called ``segnet.eval()`` and
then ``segnet.train()``. From then on the "frozen" segnet ran with dropout and batch-norm
statistics in training mode, so "Test VoE" fluctuated although no weight changed, and the
adversary learned from noisy masks. ``.train()`` after an evaluation assumes the module was
in training mode before; it also sets every submodule, including ones deliberately kept in
eval mode (a frozen encoder, a BatchNorm kept on running statistics).

The contexts here record each submodule's own ``training`` flag (and ``requires_grad`` per
parameter for :func:`frozen`) on entry and write exactly those values back on exit, also when
the body raises. They nest in any order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ModeError", "evaluating", "expect_mode", "frozen"]


def _flags(modules: tuple[nn.Module, ...]) -> dict[nn.Module, bool]:
    flags: dict[nn.Module, bool] = {}
    for root in modules:
        if not isinstance(root, nn.Module):
            raise TypeError(f"expected torch.nn.Module, got {type(root).__name__}")
        for m in root.modules():
            flags.setdefault(m, m.training)
    return flags


def _restore(flags: dict[nn.Module, bool]) -> None:
    for m, training in flags.items():
        m.training = training


@contextlib.contextmanager
def evaluating(*modules: nn.Module, inference: bool = False) -> Iterator[None]:
    """Evaluate: eval mode and no autograd inside, each submodule's own flag restored after.

    Args:
        modules: the networks to evaluate.
        inference: use ``torch.inference_mode`` instead of ``torch.no_grad``. Faster, but
            tensors made inside can never enter autograd later, so leave it off when the
            outputs feed a training step (the segnet's masks in adversary training).

    Example:
        >>> with evaluating(segnet):
        ...     probs = segnet(image).softmax(1)
    """
    flags = _flags(modules)
    grad_context = torch.inference_mode() if inference else torch.no_grad()
    try:
        for root in modules:
            root.eval()
        with grad_context:
            yield
    finally:
        _restore(flags)


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Freeze: eval mode and ``requires_grad=False`` on every parameter, both restored after.

    Autograd stays on, so gradients still flow *through* a frozen module to its inputs: this
    is what the generator step of adversarial training needs from the adversary. To run a
    frozen module without building a graph at all, nest :func:`evaluating` or
    ``torch.no_grad()`` inside.

    Args:
        modules: the networks to freeze.
    """
    flags = _flags(modules)
    params: dict[nn.Parameter, bool] = {}
    for root in modules:
        for p in root.parameters():
            params.setdefault(p, p.requires_grad)
    try:
        for root in modules:
            root.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, requires_grad in params.items():
            p.requires_grad_(requires_grad)
        _restore(flags)


class ModeError(RuntimeError):
    """A module ran its forward pass in the wrong train/eval mode."""


@contextlib.contextmanager
def expect_mode(*modules: nn.Module, training: bool) -> Iterator[None]:
    """Raise :class:`ModeError` if any submodule runs forward in the wrong mode.

    A guard for the stretches where the mode is an invariant (the segnet during adversary
    training must stay in eval mode); it checks the flag each submodule actually holds when
    it runs, through forward pre-hooks, so it catches a stray ``.train()`` anywhere.

    Args:
        modules: the networks to watch.
        training: the flag every submodule must hold when it runs.
    """

    def check(module: nn.Module, args: object) -> None:
        if module.training != training:
            want = "training" if training else "eval"
            raise ModeError(
                f"{type(module).__name__} ran with training={module.training}, expected {want} mode"
            )

    handles = [m.register_forward_pre_hook(check) for m in _flags(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
