"""Shared fixtures of the trainer tests: the smoke preset on one phantom dataset per session."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from training.config import Config, resolve_config

SmokeConfig = Callable[..., Config]


def smoke_overrides(data: Path, runs: Path) -> list[str]:
    """``--set`` values putting the smoke preset's data and runs into test folders."""
    return [
        f'data.root="{data}"',
        f'run.runs_dir="{runs}"',
        "run.progress=false",
        "data.build_workers=1",
    ]


@pytest.fixture(scope="session")
def smoke_sets() -> Callable[[Path, Path], list[str]]:
    """:func:`smoke_overrides`, for tests that build command lines or spawn processes."""
    return smoke_overrides


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset's phantom dataset and cache, generated and built once."""
    from training.data import prepare_dataset

    base = tmp_path_factory.mktemp("smoke-data")
    cfg = resolve_config(preset="smoke", overrides=smoke_overrides(base / "phantom", base))
    prepare_dataset(cfg.data, progress=False)
    return base / "phantom"


@pytest.fixture
def smoke_config(smoke_data: Path, tmp_path: Path) -> SmokeConfig:
    """``smoke_config(*overrides)``: the smoke preset on the shared dataset, runs in tmp_path."""

    def make(*overrides: str, runs: Path | None = None) -> Config:
        extra: Sequence[str] = overrides
        return resolve_config(
            preset="smoke",
            overrides=[*smoke_overrides(smoke_data, runs or tmp_path / "runs"), *extra],
        )

    return make
