"""DDP over 2 CPU processes (gloo) gives the gradients of one process on the whole batch."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ddp_helpers import free_port, set_rank_env

from training import distributed as D
from training.losses import DeepSupervisionLoss, DiceCELoss
from training.models import UNet3D

WORLD = 2


def make_net() -> UNet3D:
    return UNet3D(
        in_channels=1,
        num_classes=2,
        base_width=4,
        depth=3,
        deep_supervision=True,
        generator=torch.Generator().manual_seed(0),
    )


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, 8, generator=g)
    return x, (x[:, 0] > 0.3).long()


def make_loss() -> DeepSupervisionLoss:
    # Per-sample Dice and mean CE: the loss of the batch is the mean of the halves' losses,
    # so the gradients must agree. (Batch Dice couples samples and would not.)
    return DeepSupervisionLoss(DiceCELoss(batch_dice=False))


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    set_rank_env(rank, WORLD, port)
    info = D.init_distributed(device="cpu", timeout=timedelta(seconds=60))
    try:
        assert info.backend == "gloo" and info.world_size == WORLD and info.rank == rank
        assert D.get_rank() == rank and D.is_main() == (rank == 0)
        ddp = D.wrap_ddp(make_net(), info)
        x, y = make_batch()
        half = slice(rank * 2, rank * 2 + 2)
        make_loss()(ddp(x[half]), y[half]).backward()
        grads = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
        reduced = {
            "mean_float": D.all_reduce_mean(float(rank)),
            "sum_float": D.all_reduce_sum(rank + 1.0),
            "mean_tensor": D.all_reduce_mean(torch.tensor([rank, 2.0 * rank])),
            "seed": D.rank_seed(100),
        }
        torch.save({"grads": grads, "reduced": reduced}, Path(out) / f"rank{rank}.pt")
        D.barrier()
    finally:
        D.cleanup()


def test_ddp_gradients_equal_single_process(tmp_path, capfd):
    try:
        mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
        # The ranks write to the captured file descriptors: put what they said in the
        # failure itself, so a short report still shows why a rank died.
        err = capfd.readouterr().err
        pytest.fail(f"{exc}\n--- the ranks' stderr (last 4000 characters) ---\n{err[-4000:]}")

    net = make_net()
    x, y = make_batch()
    make_loss()(net(x), y).backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got["grads"]) == {n for n, _ in net.named_parameters()}
        for name, p in net.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-5, rtol=1e-4)
        r = got["reduced"]
        assert r["mean_float"] == 0.5 and r["sum_float"] == 3.0
        torch.testing.assert_close(r["mean_tensor"], torch.tensor([0.5, 1.0]))
        assert r["seed"] == 100 + rank


def test_single_process_fallbacks(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert info.is_main and D.is_main() and not D.is_distributed()
    assert D.get_world_size() == 1 and D.rank_seed(7) == 7 and D.rank_seed(7, rank=3) == 10
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_mean(t) is t and D.all_reduce_sum(2.5) == 2.5
    net = make_net()
    assert D.wrap_ddp(net, info) is net
    D.barrier()
    D.cleanup()
