"""The extras of ``pyproject.toml``: ``augment`` runs on the core alone, ``loaders`` and
``training`` name the extra they miss, and every module-level import of a package is
provided by the core or by that package's extra.

Missing packages are simulated in a subprocess by an import hook that refuses them (nothing
is uninstalled)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # the train extra brings tomli on Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "voxaug"
# What each package may import at module level beyond the core, by extra.
PACKAGE_EXTRAS = {"augment": "torch", "loaders": "io", "training": "train", "benchmarks": "peers"}
# Modules that importing their package does not import, and the extra they need beyond the
# package's (loaders.PatchDataset, the torch face, is imported on first use).
MODULE_EXTRAS = {"loaders/dataset.py": "torch"}
# Distributions that come with another one rather than by name: the CUDA builds of torch
# bring Triton (the CPU build, which CI installs, does not; the Triton kernel is imported
# only on CUDA); numba requires llvmlite (pinned to its own version), whose IR builder the
# CPU kernels' intrinsics use.
COMES_WITH = {"triton": "torch", "llvmlite": "numba"}
OPTIONAL = ("torch", "triton", "SimpleITK", "zarr", "numcodecs", "matplotlib", "tqdm", "skimage")

BLOCKER = """
import importlib.abc
import sys

BLOCKED = {blocked!r}


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused)", name=name)
        return None


sys.meta_path.insert(0, Refuse())
"""


def _run_without(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    script = BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def test_augment_composes_and_warps_with_only_numpy_numba_scipy() -> None:
    res = _run_without(
        (*OPTIONAL, "loaders", "training"),
        """
        import json
        import numpy as np
        from scipy import ndimage
        import augment

        rng = np.random.default_rng(0)
        img = rng.normal(size=(24, 28, 32)).astype(np.float32)
        lab = (img > 0.5).astype(np.uint8)
        aug = augment.Compose(
            [
                augment.RandomCrop((16, 16, 16)),
                augment.RandomAffine(degrees=15, scale=(0.9, 1.1)),
                augment.RandomFlip(axes=(0, 1, 2), p=0.5),
                augment.Window(-1.0, 1.0),
                augment.RandomGamma((0.7, 1.5), p=1.0),
            ]
        )
        out = aug(image=img, label=lab, rng=augment.sample_rng(seed=0, epoch=0, index=3))
        again = aug(image=img, label=lab, params=out["params"])
        c, s = np.cos(0.3), np.sin(0.3)
        m = np.array([[1.0, 0.0, 0.0, 3.5], [0.0, c, -s, 6.0], [0.0, s, c, 2.0]])
        got = augment.affine_warp(img, m, (16, 16, 16), order=1, cval=0.0)
        ref = ndimage.affine_transform(
            img.astype(np.float64), m[:, :3], offset=m[:, 3], output_shape=(16, 16, 16),
            order=1, mode="grid-constant", cval=0.0,
        )
        print(json.dumps({
            "image": [list(out["image"].shape), str(out["image"].dtype)],
            "label": [list(out["label"].shape), sorted(map(int, np.unique(out["label"])))],
            "finite": bool(np.isfinite(out["image"]).all()),
            "replayed": bool(
                np.array_equal(out["image"], again["image"])
                and np.array_equal(out["label"], again["label"])
            ),
            "warp_err": float(np.abs(got - ref).max()),
            "loaded": sorted(
                n for n in sys.modules if n.partition(".")[0] in BLOCKED
            ),
        }))
        """,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["image"] == [[16, 16, 16], "float32"]
    assert got["label"][0] == [16, 16, 16] and set(got["label"][1]) <= {0, 1}
    assert got["finite"] and got["replayed"]
    assert got["warp_err"] < 1e-4
    assert got["loaded"] == []


@pytest.mark.parametrize(
    ("package", "missing", "extra"),
    [
        ("loaders", "SimpleITK", "io"),
        ("loaders", "zarr", "io"),  # imported lazily inside loaders, checked up front
        ("training", "torch", "train"),
        ("training", "matplotlib", "train"),
    ],
)
def test_importing_a_package_without_its_extra_names_the_extra(
    package: str, missing: str, extra: str
) -> None:
    res = _run_without(
        (missing,),
        f"""
        import augment  # the core still imports
        try:
            import {package}
        except ModuleNotFoundError as exc:
            print(repr(exc.name))
            print(exc)
        else:
            print("imported")
        """,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    name, message = res.stdout.strip().split("\n", 1)
    assert name == repr(missing)
    assert f"{package} needs {missing}" in message
    assert f"pip install '{PROJECT}[{extra}]'" in message
    assert f"pip install -e '.[{extra}]'" in message


def _extras() -> tuple[set[str], dict[str, set[str]]]:
    """The core and, per extra, every distribution it brings (self-references resolved)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == PROJECT

    def names(reqs: list[str]) -> set[str]:
        out: set[str] = set()
        for text in reqs:
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                for extra in req.extras:
                    out |= names(project["optional-dependencies"][extra])
            elif req.marker is None or req.marker.evaluate():
                out.add(canonicalize_name(req.name))
        return out

    core = names(project["dependencies"])
    return core, {e: names(r) for e, r in project["optional-dependencies"].items()}


def test_the_core_is_numpy_numba_scipy_and_each_extra_what_its_package_needs() -> None:
    core, extras = _extras()
    assert core == {"numpy", "numba", "scipy"}
    assert extras["torch"] == {"torch"}
    assert {"simpleitk", "zarr", "numcodecs", "tqdm"} <= extras["io"]
    assert "torch" not in extras["io"]
    assert extras["torch"] | extras["io"] | {"matplotlib"} <= extras["train"]
    assert extras["train"] | extras["skimage"] <= extras["all"]
    assert extras["all"] | {"pytest", "hypothesis", "ruff", "mypy"} <= extras["dev"]
    assert extras["all"] | {"monai", "torchio", "batchgeneratorsv2"} <= extras["peers"]


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported unconditionally when ``path`` is imported."""
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:  # not inside try / if / functions
        if isinstance(node, ast.Import):
            out |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.partition(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(PACKAGE_EXTRAS))
def test_module_level_imports_come_from_the_core_or_the_package_extra(package: str) -> None:
    core, extras = _extras()
    allowed = core | extras[PACKAGE_EXTRAS[package]]
    allowed |= {dist for dist, via in COMES_WITH.items() if via in allowed}
    dists = importlib.metadata.packages_distributions()
    ours = set(PACKAGE_EXTRAS)
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module_extra = MODULE_EXTRAS.get(path.relative_to(ROOT).as_posix())
        here = allowed | (extras[module_extra] if module_extra else set())
        for name in _module_level_imports(path) - ours - set(sys.stdlib_module_names):
            provided = {canonicalize_name(d) for d in dists.get(name, [])}
            if not provided & here:
                bad.append(f"{path.relative_to(ROOT)} imports {name} ({sorted(provided)})")
    assert not bad, f"not provided by the core or the {PACKAGE_EXTRAS[package]} extra: {bad}"


def test_readme_set_up_commands_name_real_extras_and_ci_runs_the_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```shell\n(.*?)\n```", readme, flags=re.DOTALL)
    train, test = blocks[0], blocks[1]  # the two first commands: a complete set-up each
    assert train == 'python -m pip install -e ".[train]" && python -m training.run'
    assert test == 'python -m pip install -e ".[dev]" && python -m pytest -q'
    _, extras = _extras()
    named = {
        e
        for block in blocks
        for group in re.findall(r'"\.\[(.*?)\]"', block)
        for e in group.split(",")
    }
    assert named and named <= set(extras), named - set(extras)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test in ci
