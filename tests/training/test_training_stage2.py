"""The seed notes' bug, on the real trainer: stage 2 must leave the segnet exactly as it was.

A ``Trainer`` on the smoke preset with dropout in the segnet runs stage 1, then stage 2 with
a gate evaluation after every epoch (held-out accuracy, the segnet's VoE on the held-out
patches, and, with ``stage2.monitor_voe``, its sliding-window train VoE): evaluations in
the middle of stage 2. Checked, as the notes checked by hand: the segnet's parameters and
buffers are bit-identical before and after stage 2; repeated evaluations give identical
VoE; and the segnet is in eval mode with ``requires_grad`` off throughout stage 2, recorded
at every forward pass of either network. The negative control puts the notes' evaluation
(``eval()``, then a blanket ``train()``) into the trainer's evaluation code and must fail
these checks.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import training.evaluation
from training.modes import ModeError
from training.trainer import Trainer

STAGE2_EPOCHS = 3


@dataclass
class Record:
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    after: dict[str, torch.Tensor] = field(default_factory=dict)
    segnet_flags: list[bool] = field(default_factory=list)  # at every segnet forward
    watch: list[tuple[bool, bool]] = field(default_factory=list)  # at every adversary forward
    gates: list[dict] = field(default_factory=list)
    stage1_voe: float = float("nan")


def run_stages_1_and_2(cfg) -> Record:
    rec = Record()
    tr = Trainer(cfg)
    try:
        tr.fit(stop_after="segnet")
        assert tr.segnet.training, "stage 1 leaves the segnet in training mode"
        seg: nn.Module = tr.segnet
        rec.before = {k: v.clone() for k, v in seg.state_dict().items()}

        def on_segnet(module: nn.Module, args: object) -> None:
            rec.segnet_flags.append(module.training)

        def on_adversary(module: nn.Module, args: object) -> None:
            rec.watch.append(
                (
                    any(m.training for m in seg.modules()),
                    any(p.requires_grad for p in seg.parameters()),
                )
            )

        hooks = [m.register_forward_pre_hook(on_segnet) for m in seg.modules()]
        hooks.append(tr.adversary.register_forward_pre_hook(on_adversary))
        try:
            tr.fit(stop_after="adversary")
        finally:
            for h in hooks:
                h.remove()
        rec.after = {k: v.clone() for k, v in seg.state_dict().items()}
        assert seg.training, "frozen() gives back the flag stage 1 left"
        assert all(p.requires_grad for p in seg.parameters())
    finally:
        tr.close()
    log = [json.loads(line) for line in tr.log.path.read_text().splitlines()]
    rec.gates = [e for e in log if e["event"] == "gate" and e["stage"] == "adversary"]
    rec.stage1_voe = [e for e in log if e["event"] == "gate" and e["stage"] == "segnet"][-1][
        "train_voe"
    ]
    return rec


def check(rec: Record) -> None:
    assert rec.before.keys() == rec.after.keys() and rec.before
    for k in rec.before:
        assert torch.equal(rec.before[k], rec.after[k]), f"segnet {k} changed in stage 2"
    assert len(rec.gates) == STAGE2_EPOCHS
    first = rec.gates[0]
    for g in rec.gates[1:]:
        assert g["segnet_voe"] == first["segnet_voe"], "repeated held-out VoE differs"
        assert g["train_voe"] == first["train_voe"], "repeated train VoE differs"
    assert first["train_voe"] == rec.stage1_voe, "stage 2 sees another segnet than stage 1 left"
    assert rec.segnet_flags and not any(rec.segnet_flags), "segnet ran in training mode"
    assert rec.watch, "the adversary never ran"
    assert not any(t for t, _ in rec.watch), "segnet in training mode during stage 2"
    assert not any(g for _, g in rec.watch), "segnet parameters require grad in stage 2"


@pytest.fixture
def stage2_config(smoke_config):
    return smoke_config(
        "model.dropout=0.3",
        "stage1.max_epochs=1",
        f"stage2.max_epochs={STAGE2_EPOCHS}",
        "stage2.gate=1.01",  # never reached: every epoch ends with a gate evaluation
        "stage2.monitor_voe=true",
        "run.gate_every=1",
    )


def test_stage2_leaves_the_segnet_bit_identical_and_in_eval_mode(stage2_config):
    check(run_stages_1_and_2(stage2_config))


@contextlib.contextmanager
def notes_evaluation(*modules: nn.Module, inference: bool = False) -> Iterator[None]:
    """The seed notes' test routine: eval(), evaluate, then a blanket train()."""
    for m in modules:
        m.eval()
    with torch.no_grad():
        yield
    for m in modules:
        m.train()


def test_the_notes_evaluation_is_caught(stage2_config, monkeypatch):
    monkeypatch.setattr(training.evaluation, "evaluating", notes_evaluation)
    try:
        rec = run_stages_1_and_2(stage2_config)
    except ModeError:
        return  # the trainer's own guard (expect_mode on the segnet) stopped it
    with pytest.raises(AssertionError, match="training mode"):
        check(rec)
