"""The curated ``training`` namespace: every export resolves, and imports stay light."""

from __future__ import annotations

import subprocess
import sys

import training


def test_every_export_resolves():
    assert sorted(training.__all__) == sorted(training._EXPORTS)
    for name in training.__all__:
        assert getattr(training, name) is not None, name
    assert set(training.__all__) <= set(dir(training))


def test_metrics_import_does_not_import_torch():
    code = "import sys, training, training.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
