"""training.schedule: the stages from the config, gates, alternation, learning-rate rules,
and the trainer's optimizers looked up by stage."""

from __future__ import annotations

import math

import pytest

from training.config import ConfigError, resolve_config
from training.schedule import STAGES, State, make_stages
from training.trainer import Trainer


def test_stages_follow_the_config():
    cfg = resolve_config(
        preset="cpu",
        overrides=[
            "stage1.gate=0.25",
            "stage2.gate=0.8",
            "stage2.lr=1e-4",
            "stage3.k_d=2",
            "stage3.k_g=5",
            "stage3.adv_weight=0.1",
            "run.gate_every=3",
        ],
    )
    s1, s2, s3 = make_stages(cfg)
    assert (s1.name, s2.name, s3.name) == STAGES and [s.number for s in (s1, s2, s3)] == [1, 2, 3]
    assert (s1.gate, s2.gate, s3.gate) == (
        "train_voe < 0.25",
        "heldout_accuracy >= 0.8",
        "train_voe < 0.15",
    )
    assert s1.trains_segnet and not s2.trains_segnet and s3.trains_segnet
    assert (s2.adversary_lr, s3.adversary_lr) == (1e-4, 1e-4)
    assert (s1.adv_weight, s2.adv_weight, s3.adv_weight) == (0.0, 0.0, 0.1)
    assert (s1.lr, s3.lr) == (cfg.stage1.lr, cfg.stage3.lr)
    assert (s1.warmup_steps, s3.warmup_steps) == (cfg.stage1.warmup_steps, cfg.stage3.warmup_steps)


def test_gates_and_their_schedule():
    s1, s2, _ = make_stages(resolve_config(preset="cpu", overrides=["run.gate_every=2"]))
    assert s1.reached(0.19) and not s1.reached(0.2) and not s1.reached(math.nan)
    assert s2.reached(0.9) and not s2.reached(0.89) and not s2.reached(math.nan)
    cap = s1.max_epochs  # 5: measured after epochs 2 and 4, and at the cap 5
    assert [e for e in range(1, cap + 1) if s1.gate_due(e)] == [2, 4, 5]
    s2_cap = s2.max_epochs  # 5: after 2, 4 and at the cap 5
    assert [e for e in range(1, s2_cap + 1) if s2.gate_due(e)] == [2, 4, 5]


def test_alternation_runs_the_adversary_first_in_each_cycle():
    _, s2, s3 = make_stages(
        resolve_config(preset="cpu", overrides=["stage3.k_d=2", "stage3.k_g=3"])
    )
    assert [s3.updates(t) for t in range(6)] == [
        (False, True),
        (False, True),
        (True, False),
        (True, False),
        (True, False),
        (False, True),
    ]
    assert all(s2.updates(t) == (False, True) for t in range(5))
    s1 = make_stages(resolve_config(preset="cpu"))[0]
    assert all(s1.updates(t) == (True, False) for t in range(5))


def test_segnet_learning_rate_is_nnunet_poly_after_a_linear_warmup():
    cfg = resolve_config(
        preset="cpu",
        overrides=[
            "stage1.lr=0.01",
            "stage1.warmup_steps=4",
            "stage1.max_epochs=2",
            "stage1.steps_per_epoch=5",
            "stage3.lr=0.002",
            "stage3.warmup_steps=2",
            "stage3.max_epochs=1",
            "stage3.steps_per_epoch=8",
        ],
    )
    s1, _, s3 = make_stages(cfg)
    # nnU-Net's PolyLRScheduler: initial_lr * (1 - step / max_steps) ** 0.9, here over the
    # stage's cap of 2 x 5 batches; the warm-up multiplies by (step + 1) / 4 until it is 1
    assert s1.segnet_lr(0) == pytest.approx(0.01 * 0.25 * (1 - 0 / 10) ** 0.9)
    assert s1.segnet_lr(1) == pytest.approx(0.01 * 0.5 * 0.9**0.9)
    assert s1.segnet_lr(3) == pytest.approx(0.01 * 0.7**0.9)
    assert s1.segnet_lr(6) == pytest.approx(0.01 * 0.4**0.9)
    assert s1.segnet_lr(10) == 0.0 and s1.segnet_lr(12) == 0.0
    # stage 3: a new rate with its own warm-up (the fresh optimizer), poly over its 8 batches
    assert s3.segnet_lr(0) == pytest.approx(0.002 * 0.5)
    assert s3.segnet_lr(1) == pytest.approx(0.002 * (1 - 1 / 8) ** 0.9)
    assert s3.segnet_lr(4) == pytest.approx(0.002 * 0.5**0.9)
    no_warmup = make_stages(
        resolve_config(preset="cpu", overrides=["stage3.warmup_steps=0", "stage3.lr=0.002"])
    )[2]
    assert no_warmup.segnet_lr(0) == 0.002


def test_epoch_decay_restarts_the_poly_schedule_at_each_epoch():
    cfg = resolve_config(
        preset="cpu",
        overrides=[
            "stage1.lr=0.01",
            "stage1.warmup_steps=2",
            "stage1.max_epochs=3",
            "stage1.steps_per_epoch=4",
            "stage1.decay=epoch",
            "stage3.lr=0.002",
            "stage3.warmup_steps=0",
            "stage3.max_epochs=3",
            "stage3.steps_per_epoch=5",
            "stage3.decay=epoch",
        ],
    )
    s1, _, s3 = make_stages(cfg)
    assert (s1.decay, s3.decay) == ("epoch", "epoch")
    # poly over the 4 batches of each epoch: (1 - b / 4) ** 0.9 for batch b of the epoch; the
    # warm-up only multiplies the stage's first batches
    assert s1.segnet_lr(0) == pytest.approx(0.01 * 0.5)
    assert s1.segnet_lr(1) == pytest.approx(0.01 * 0.75**0.9)
    assert s1.segnet_lr(3) == pytest.approx(0.01 * 0.25**0.9)
    assert s1.segnet_lr(4) == pytest.approx(0.01)  # epoch 2 starts again at the peak
    assert s1.segnet_lr(7) == pytest.approx(0.01 * 0.25**0.9)
    assert s1.segnet_lr(10) == pytest.approx(0.01 * 0.5**0.9)
    assert [s3.segnet_lr(t) for t in range(5)] == pytest.approx(
        [s3.segnet_lr(t) for t in range(5, 10)]
    )
    assert s3.segnet_lr(9) == pytest.approx(0.002 * 0.2**0.9) and s3.segnet_lr(10) == 0.002
    # stage 1's default keeps the single decay over its cap of 3 epochs
    cap = make_stages(resolve_config(preset="cpu", overrides=["stage1.max_epochs=3"]))[0]
    assert cap.decay == "cap"
    assert cap.segnet_lr(cap.steps_per_epoch) == pytest.approx(cap.lr * (1 - 1 / 3) ** 0.9)


def test_an_unknown_decay_is_refused():
    with pytest.raises(ConfigError, match=r"stage3\.decay = 'linear'.*cap\|epoch"):
        resolve_config(preset="cpu", overrides=["stage3.decay=linear"])


def test_state_round_trip_and_stage_start():
    st = State(stage=1, epoch=2, batch=3, step=40, stage_step=9, gate_value=0.5)
    st.sums = {"loss_d": 1.0, "n_loss_d": 1.0}
    st.wait_s = {"segnet": 1.5}
    again = State.from_dict({**st.as_dict(), "from_a_later_version": 1})
    assert again == st
    st.start_stage(2)
    assert (st.stage, st.epoch, st.batch, st.stage_step, st.step) == (2, 0, 0, 0, 40)
    assert math.isnan(st.gate_value) and st.sums == {} and st.wait_s == {"segnet": 1.5}
    assert not st.finished
    st.start_stage(3)
    assert st.finished
    st.reset_timing()
    assert st.wait_s == st.compute_s == st.steps == {}


def test_trainer_looks_optimizers_up_by_stage_and_applies_the_rates(smoke_config):
    tr = Trainer(smoke_config("run.max_steps=3", "stage1.warmup_steps=2"))
    try:
        s1, s2, s3 = tr.stages
        assert set(tr.segnet_optimizers) == {s1, s3}
        opt1, opt3 = tr.segnet_optimizers[s1], tr.segnet_optimizers[s3]
        assert opt1 is not opt3 and tr.adversary_optimizer not in (opt1, opt3)
        segnet_params = {id(p) for p in tr.segnet.parameters()}
        for opt in (opt1, opt3):
            assert {id(p) for g in opt.param_groups for p in g["params"]} == segnet_params
        tr.fit()
        assert tr.stopped == "max_steps" and tr.state.step == 3
        # the rate of the last step taken (stage step 2), from the schedule
        assert opt1.param_groups[0]["lr"] == s1.segnet_lr(2)
        assert opt1.state and not opt3.state  # stage 3's optimizer has not stepped yet
    finally:
        tr.close()
