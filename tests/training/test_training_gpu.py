"""The trainer on CUDA: bf16 autocast, GPU augmentation through the loader, and
``python -m benchmarks.gpu_check``.

Marked ``gpu`` and skipped without a CUDA device.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.gpu_check import main as gpu_check
from training.run import finish
from training.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_smoke_on_cuda_with_bf16_and_gpu_augmentation(smoke_config):
    tr = Trainer(smoke_config('run.device="cuda"', "data.num_workers=1", "run.log_every=2"))
    try:
        assert tr.device.type == "cuda" and tr.amp_dtype is torch.bfloat16
        assert tr.loader.mode == "gpu" and not tr.channels_last
        batch = next(iter(tr.loader.epoch(0)))
        assert batch["image"].device.type == "cuda" and batch["image"].dtype == torch.float32
        tr.fit()
        summary = finish(tr, started=0.0)
    finally:
        tr.close()
    assert [s["name"] for s in summary["stages"]] == ["segnet", "adversary", "adversarial"]
    assert summary["device"].startswith("cuda")
    assert summary["val"]["resolution"] == "native"
    assert 0.0 <= summary["val"]["classes"]["liver"]["voe"] <= 1.0
    saved = json.loads((tr.run_dir / "summary.json").read_text())
    assert saved["stages"] == summary["stages"]


def test_gpu_check_prints_its_table(tmp_path, capsys):
    code = gpu_check(
        [
            "--seconds",
            "8",
            "--data",
            str(tmp_path / "data"),
            "--set",
            "data.phantom_cases=3",
            "--set",
            "data.val_cases=1",
            "--set",
            'data.phantom_size="small"',
            "--set",
            "data.spacing=[4.0, 4.0, 4.0]",
            "--set",
            "data.patch_size=[32, 64, 64]",
            "--set",
            "model.base_width=8",
            "--set",
            "model.depth=4",
            "--set",
            "model.adv_depth=3",
            "--set",
            f'run.runs_dir="{tmp_path / "runs"}"',
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "stage 1 (segnet)" in out and "stage 3 (adversarial)" in out
    rows = json.loads((tmp_path / "runs" / "gpu_check" / "gpu_check.json").read_text())["rows"]
    assert all(r["batches"] > 0 and r["peak_mem_gib"] > 0 for r in rows)
