"""The staged schedule: the three stages, their gates and learning-rate rules, and the state.

The schedule of the seed notes (DESIGN.md):

=============  =====================================  =================================
stage          who learns                             gate (each with an epoch cap)
=============  =====================================  =================================
segnet         segnet, Dice + cross-entropy           train VoE < ``stage1.gate``
adversary      adversary alone; segnet frozen (eval   held-out accuracy >= ``stage2.gate``
               mode, no grad, requires_grad off)
adversarial    segnet: seg loss + lambda x non-       train VoE < ``stage3.gate``
               saturating adversarial loss, new LR;
               adversary in alternation (k_D : k_G)
=============  =====================================  =================================

"Train VoE" is defined in :mod:`training.evaluation`. A gate is measured every
``run.gate_every`` epochs and at the cap; the stage ends when it is reached, or at the cap,
which is logged as ``"reached": false``.

Learning rates: the segnet follows nnU-Net's poly schedule, ``lr * (1 - t / T) ** 0.9``,
after a linear warm-up. With ``decay = "cap"`` it runs once over the stage's cap of ``T``
batches (the gate may end the stage earlier, at a rate that never decayed); with ``decay =
"epoch"`` ``t`` counts the batches of the epoch and ``T`` is the epoch's length, so the rate
starts again from ``lr`` at each epoch and every gate measures a segnet trained down to a
low rate (the warm restarts of SGDR, Loshchilov & Hutter 2017, with nnU-Net's poly shape).
Stage 3 starts again from its own, new rate with a fresh optimizer and its own warm-up
(``stage3.warmup_steps``; without one, train VoE of the bare run rose for an epoch after the
switch: 0.185 -> 0.214 in seed 0). The adversary's rate is constant, ``stage2.lr``, in
stages 2 and 3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from training.config import Config

__all__ = ["STAGES", "Stage", "State", "make_stages"]

STAGES = ("segnet", "adversary", "adversarial")
"""The stage names, in schedule order."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the schedule: who trains, its gate and its learning rates.

    Attributes:
        name: ``"segnet"``, ``"adversary"`` or ``"adversarial"``.
        number: 1, 2 or 3 (config section ``stage<number>``).
        metric: what the gate measures (``"train_voe"`` or ``"heldout_accuracy"``).
        below: the gate is ``metric < threshold`` (else ``metric >= threshold``).
        threshold: the gate's value.
        max_epochs: the cap.
        steps_per_epoch: batches per epoch.
        k_d: adversary updates per cycle (0: the adversary does not train).
        k_g: segnet updates per cycle (0: the segnet is frozen for the whole stage).
        gate_every: the gate is measured every this many epochs (and at the cap).
        lr: the segnet's peak learning rate (stages that train it).
        weight_decay: the segnet optimizer's weight decay.
        warmup_steps: linear warm-up of the segnet's rate, in batches of the stage.
        decay: the poly decay's span, ``"cap"`` (the stage's cap) or ``"epoch"`` (each epoch).
        adversary_lr: the adversary's constant learning rate (stages that train it).
        adv_weight: lambda, the weight of the adversarial loss in the segnet's loss.
    """

    name: str
    number: int
    metric: str
    below: bool
    threshold: float
    max_epochs: int
    steps_per_epoch: int
    k_d: int
    k_g: int
    gate_every: int = 1
    lr: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: str = "cap"
    adversary_lr: float = 0.0
    adv_weight: float = 0.0

    @property
    def gate(self) -> str:
        """The gate as text, e.g. ``"train_voe < 0.2"``."""
        return f"{self.metric} {'<' if self.below else '>='} {self.threshold:g}"

    @property
    def trains_segnet(self) -> bool:
        """Whether the segnet learns in this stage (else it is frozen throughout)."""
        return self.k_g > 0

    def reached(self, value: float) -> bool:
        """Whether ``value`` passes the gate (NaN never does)."""
        return value < self.threshold if self.below else value >= self.threshold

    def gate_due(self, epochs_done: int) -> bool:
        """Whether the gate is measured after ``epochs_done`` epochs of the stage."""
        return epochs_done % self.gate_every == 0 or epochs_done >= self.max_epochs

    def updates(self, stage_step: int) -> tuple[bool, bool]:
        """``(segnet, adversary)``: which blocks run on batch ``stage_step`` of the stage.

        A cycle is ``k_d + k_g`` batches: the adversary's ``k_d`` first, then the segnet's.
        """
        phase = stage_step % (self.k_d + self.k_g)
        return phase >= self.k_d, phase < self.k_d

    def segnet_lr(self, stage_step: int) -> float:
        """The segnet's learning rate on batch ``stage_step`` of the stage: poly decay over
        the cap (``decay = "cap"``) or over the batch's epoch (``"epoch"``), times the linear
        warm-up (1 once ``stage_step + 1 >= warmup_steps``)."""
        if self.decay == "epoch":
            t, span = stage_step % self.steps_per_epoch, self.steps_per_epoch
        else:
            t, span = stage_step, self.max_epochs * self.steps_per_epoch
        poly = max(1.0 - t / span, 0.0) ** 0.9
        return self.lr * poly * min(1.0, (stage_step + 1) / max(self.warmup_steps, 1))


def make_stages(cfg: Config) -> list[Stage]:
    """The three stages from the configuration.

    Args:
        cfg: the configuration (sections ``stage1`` to ``stage3`` and ``run.gate_every``).

    Returns:
        The stages in schedule order, named as :data:`STAGES`.
    """
    s1, s2, s3 = cfg.stage1, cfg.stage2, cfg.stage3
    every = cfg.run.gate_every
    return [
        Stage(
            "segnet",
            1,
            "train_voe",
            True,
            s1.gate,
            s1.max_epochs,
            s1.steps_per_epoch,
            k_d=0,
            k_g=1,
            gate_every=every,
            lr=s1.lr,
            weight_decay=s1.weight_decay,
            warmup_steps=s1.warmup_steps,
            decay=s1.decay,
        ),
        Stage(
            "adversary",
            2,
            "heldout_accuracy",
            False,
            s2.gate,
            s2.max_epochs,
            s2.steps_per_epoch,
            k_d=1,
            k_g=0,
            gate_every=every,
            adversary_lr=s2.lr,
        ),
        Stage(
            "adversarial",
            3,
            "train_voe",
            True,
            s3.gate,
            s3.max_epochs,
            s3.steps_per_epoch,
            k_d=s3.k_d,
            k_g=s3.k_g,
            gate_every=every,
            lr=s3.lr,
            weight_decay=s3.weight_decay,
            warmup_steps=s3.warmup_steps,
            decay=s3.decay,
            adversary_lr=s2.lr,
            adv_weight=s3.adv_weight,
        ),
    ]


@dataclasses.dataclass
class State:
    """Where training stands; saved in every checkpoint (``extra["state"]``).

    Attributes:
        stage: index into :data:`STAGES` (3 when all are done).
        epoch: epochs completed in the current stage.
        batch: batches completed in the current epoch.
        step: optimizer steps in total (segnet and adversary).
        stage_step: batches completed in the current stage (warm-up, alternation).
        results: one dict per finished stage: name, gate, value, reached, epochs.
        gate_value: the last gate measurement of the current stage (NaN before one).
        sums: loss sums and counts of the epoch in progress.
        wait_s: seconds spent waiting for batches, per stage name.
        compute_s: seconds spent in the steps, per stage name.
        steps: batches trained, per stage name.
    """

    stage: int = 0
    epoch: int = 0
    batch: int = 0
    step: int = 0
    stage_step: int = 0
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    gate_value: float = math.nan
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    wait_s: dict[str, float] = dataclasses.field(default_factory=dict)
    compute_s: dict[str, float] = dataclasses.field(default_factory=dict)
    steps: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Whether every stage has ended."""
        return self.stage >= len(STAGES)

    def start_stage(self, index: int) -> None:
        """Stand at the first batch of stage ``index`` (its epoch, batch and gate reset).

        Args:
            index: into :data:`STAGES`; ``len(STAGES)`` once the schedule is done.
        """
        self.stage = index
        self.epoch = self.batch = self.stage_step = 0
        self.gate_value = math.nan
        self.sums = {}

    def reset_timing(self) -> None:
        """Forget the wait / compute seconds and step counts (timing runs)."""
        self.wait_s, self.compute_s, self.steps = {}, {}, {}

    def as_dict(self) -> dict[str, Any]:
        """The state as plain containers (for the checkpoint)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> State:
        """The state from :meth:`as_dict` output; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})
