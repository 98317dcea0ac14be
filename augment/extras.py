"""The check that an optional extra of the distribution is installed, made before importing it.

``loaders`` and ``training`` call :func:`require_extra` at import time, so that a missing
optional dependency is one clear message naming the extra to install, not a traceback from
deep inside a module. ``augment`` itself needs only the core dependencies.
"""

from __future__ import annotations

import importlib.util


def absent_modules(names: tuple[str, ...]) -> list[str]:
    """The ones of ``names`` that cannot be imported, found without importing them.

    Args:
        names: top-level module names.

    Returns:
        Those not installed, in the order given.
    """
    absent = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # refused by an import hook, or a broken entry
            found = False
        if not found:
            absent.append(name)
    return absent


def require_extra(package: str, names: tuple[str, ...], extra: str, note: str = "") -> None:
    """Raise if any of ``names`` is not installed, saying which extra brings them.

    Args:
        package: the package that needs them (named in the message).
        names: the modules it imports beyond the core.
        extra: the extra of the ``voxaug`` distribution that installs them.
        note: appended inside the message's parenthesis, e.g. which extras include this one.

    Raises:
        ModuleNotFoundError: naming the missing modules and the pip command; its ``name`` is
            the first missing module.
    """
    if missing := absent_modules(names):
        raise ModuleNotFoundError(
            f"{package} needs {', '.join(missing)}, not installed here: install the {extra} "
            f"extra, python -m pip install 'voxaug[{extra}]' (from a checkout: python -m pip "
            f"install -e '.[{extra}]'{note})",
            name=missing[0],
        )
