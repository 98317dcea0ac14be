"""The trainer under DDP: 2 CPU processes (gloo) take the step one process takes on both
halves of the batch.

Each rank builds the real ``Trainer`` from the smoke preset with one patch per step, measures
the stage-1 gate (train VoE: each rank segments its share of the cases, sums are reduced)
and runs one optimizer step through the DDP-wrapped segnet. One process with two patches
per step must get the same gate value and the same gradients: rank r draws sample indices
``i * 2 + r``, so the ranks' batches together are the single process's batch. Per-sample
Dice (``model.batch_dice=false``) makes the batch loss the mean of the halves' losses.
A third of the patches are centred on the liver (``data.foreground=0.33``, nnU-Net's
oversampling, not the cpu preset's uniform centres): a tiny-patch batch of nearly constant air
sends instance norm's backward through a tiny variance, where the summation orders of one and
two processes differ by ~1e-3 of the gradient, far above float32 rounding elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp
from ddp_helpers import free_port, set_rank_env
from torch.nn.parallel import DistributedDataParallel

from training import distributed as D
from training.config import resolve_config
from training.trainer import Trainer

WORLD = 2
COMMON = [
    "model.batch_dice=false",
    "data.foreground=0.33",
    "run.max_steps=1",
    "run.threads=1",
    "run.amp=off",  # float32: the gradients are compared to 1e-5, beyond bf16's precision
    'run.name="ddp"',
]


def one_step(overrides: list[str]) -> dict:
    tr = Trainer(resolve_config(preset="smoke", overrides=overrides))
    try:
        gate = tr.measure_gate(tr.stages[0])["value"]
        tr.fit()
        assert tr.stopped == "max_steps" and tr.state.step == 1
        return {
            "gate": gate,
            "grads": {n: p.grad.clone() for n, p in tr.segnet.named_parameters()},
            "ddp": isinstance(tr.segnet_train, DistributedDataParallel),
            "world": tr.dist.world_size,
        }
    finally:
        tr.close()


def worker(rank: int, port: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    set_rank_env(rank, WORLD, port)
    try:
        got = one_step(overrides)
        torch.save(got, Path(out) / f"rank{rank}.pt")
    finally:
        D.cleanup()


def test_trainer_ddp_step_equals_one_process(smoke_data, smoke_sets, tmp_path, monkeypatch):
    sets = smoke_sets(smoke_data, tmp_path / "runs")
    mp.spawn(
        worker,
        args=(free_port(), str(tmp_path), [*sets, *COMMON, "data.batch_size=1"]),
        nprocs=WORLD,
        join=True,
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    try:
        want = one_step([*sets, *COMMON, 'run.name="single"', "data.batch_size=2"])
    finally:
        torch.set_num_threads(threads)  # run.threads=1 set it for this process
    assert not want["ddp"] and want["world"] == 1
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["ddp"] and got["world"] == WORLD
        assert abs(got["gate"] - want["gate"]) < 1e-9, (got["gate"], want["gate"])
        assert set(got["grads"]) == set(want["grads"])
        for name, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4)
