"""The staged segnet + adversary trainer: ``for stage: for epoch: for batch:``.

The stages, their gates and learning rates are :mod:`training.schedule`; checkpoint files
are :mod:`training.checkpoint`; ``metrics.jsonl`` is :class:`training.report.MetricsLog`.

In :meth:`Trainer.fit` every batch goes through at most two explicit blocks: (1) the
segnet's update, with the segnet in training mode and the adversary frozen; (2) the
adversary's update, with the adversary in training mode and the segnet evaluated in eval mode
without autograd. Stage 2 runs entirely inside ``frozen(segnet)`` and
``expect_mode(segnet, training=False)``, so a stray ``.train()`` anywhere raises instead of
silently turning dropout back on (the bug of the seed notes).

The loops start where the :class:`~training.schedule.State` stands (a resumed run, or a
``fit`` called again after ``stop_after`` / ``max_seconds``): at its stage, epoch and batch;
the loader makes the batches of an epoch from any start (``PatchLoader.epoch(e,
start_batch=k)``), the same ones an uninterrupted run sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from training import distributed as D
from training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    make_checkpoint,
    prune_checkpoints,
    restore_checkpoint,
    restore_rng_state,
    save_checkpoint,
    state_dict_mismatch,
)
from training.config import Config, check_device, check_folders, to_dict, to_toml
from training.data import (
    HELDOUT_EPOCH,
    Dataset,
    epoch_key,
    load_volumes,
    make_loader,
    make_sampler,
    prepare_dataset,
)
from training.evaluation import heldout_scores, train_voe
from training.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    adversary_accuracy,
    discriminator_loss,
    generator_loss,
    one_hot,
)
from training.models import Discriminator3D, UNet3D
from training.modes import evaluating, expect_mode, frozen
from training.report import MetricsLog
from training.schedule import STAGES, Stage, State, make_stages

__all__ = [
    "SEGNET_GRAD_CLIP",
    "NonFiniteLossError",
    "OutOfMemoryError",
    "Trainer",
    "TrainingInterrupted",
    "amp_dtype",
    "channels_last_weights",
    "cpu_has_native_bf16",
]

SEGNET_GRAD_CLIP = 12.0
"""Largest global L2 norm of the segnet's gradients in a step (after AMP unscaling). It is
nnU-Net's value (its trainer clips at 12 with the same poly schedule and Dice + CE loss):
it only bounds the rare outsized step, such as the first steps of a fresh optimizer. Not
tuned here. The adversary's gradients are not clipped."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stopped without saving over good checkpoints."""


class OutOfMemoryError(RuntimeError):
    """CUDA ran out of memory; the message names the sizes to lower."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT: a checkpoint was saved and training stopped; ``--resume`` continues it."""


def _first(out: Tensor | list[Tensor]) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX). oneDNN also runs
    bf16 on plain AVX-512 by converting to float32 (``torch.ops.mkldnn.
    _is_mkldnn_bf16_supported`` says True there), which was not measured here, so that
    does not count."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``run.amp`` on ``device`` (None: float32).

    ``"auto"`` is bf16 on CUDA, and on a CPU with native bf16 (:func:`cpu_has_native_bf16`):
    there a training step of the default U-Net took 0.6x the time of float32 on the 2-core
    VM, and the default run's validation figures in the README were measured with it.
    Elsewhere ``"auto"`` is float32.
    """
    if amp == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


class Trainer:
    """The staged trainer: builds everything from a :class:`Config`, then :meth:`fit`.

    Settings that depend on the machine (the device, writable run and cache folders) and a
    ``resume`` checkpoint are checked before the dataset is prepared, and the run folder is
    made only once the dataset was accepted.

    Args:
        cfg: the resolved configuration.
        resume: continue from the newest intact checkpoint in the run folder (``True``;
            damaged ones are skipped with a warning) or from a given checkpoint file;
            ``False`` starts afresh (an existing run folder's checkpoints are then ignored,
            and overwritten as steps recur).
        progress: tqdm bars (default ``cfg.run.progress``; only on rank 0).

    Attributes:
        segnet, adversary: the networks (unwrapped; DDP and compile wrappers are separate).
        segnet_optimizers: the segnet's optimizer of each stage that trains it (stage 3
            starts a fresh one), keyed by the :class:`~training.schedule.Stage`.
        adversary_optimizer: the adversary's optimizer (stages 2 and 3).
        state: the :class:`~training.schedule.State`.
        stages: the :class:`~training.schedule.Stage` list.
        run_dir: ``runs_dir/name``.
        log: the run's :class:`~training.report.MetricsLog`.
        resumed_from: the checkpoint the run continued from, or None.

    Raises:
        ConfigError: a setting this machine cannot honour.
        FileNotFoundError: ``resume`` and no checkpoint.
        CheckpointError: ``resume`` and no intact checkpoint.
        TrainingDataError: the dataset is refused.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        resume: bool | str | os.PathLike[str] = False,
        progress: bool | None = None,
    ) -> None:
        self.cfg = cfg.validate()
        r = cfg.run
        check_device(cfg)
        self.dist = D.init_distributed(device=None if r.device == "auto" else r.device)
        self.device = self.dist.device
        self.main = self.dist.is_main
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.main:
            check_folders(cfg)
        resumed: tuple[Path, dict[str, Any]] | None = None
        if resume is True:
            try:
                resumed = load_latest_checkpoint(self.ckpt_dir)
            except FileNotFoundError:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir}") from None
        elif resume:
            resumed = Path(resume), load_checkpoint(resume)
        cpu = self.device.type == "cpu"
        if cpu and r.threads > 0:
            torch.set_num_threads(r.threads)
        # Dropout draws from torch's global RNG (nn.Dropout3d takes no generator): seed it per
        # rank; its state is saved in every checkpoint.
        torch.manual_seed(D.rank_seed(r.seed))
        self.amp_dtype = amp_dtype(r.amp, self.device)
        self.channels_last = r.channels_last == "on" or (r.channels_last == "auto" and cpu)
        self.progress = (r.progress if progress is None else progress) and self.main

        # data: rank 0 generates and builds, the others open what it built; what the data
        # decides (layout, classes, normalisation) goes into the configuration the run saves
        if self.main:
            self.dataset: Dataset = prepare_dataset(cfg.data, progress=self.progress)
        D.barrier()
        if not self.main:
            self.dataset = prepare_dataset(cfg.data, build=False)
        self.cfg = cfg = dataclasses.replace(cfg, data=self.dataset.resolved(cfg.data))
        self.classes = self.dataset.classes
        self.num_classes = self.classes.count
        # label values -> class indices, applied to each batch on the device
        self.label_lut = torch.as_tensor(self.classes.lut(), dtype=torch.long, device=self.device)
        self.stages = make_stages(cfg)
        self.sampler = make_sampler(self.dataset, cfg.data, seed=r.seed)
        self.heldout_batches = math.ceil(cfg.stage2.heldout_pairs / cfg.data.batch_size)
        self.loader = make_loader(
            self.sampler,
            cfg.data,
            batches_per_epoch=max(
                [s.steps_per_epoch for s in self.stages] + [self.heldout_batches]
            ),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.device,
        )
        gate_ids = self.dataset.train[: r.gate_cases] if r.gate_cases else self.dataset.train
        self.gate_volumes = load_volumes(self.dataset, gate_ids)

        # the run folder, once the data was accepted: the resolved configuration, the log
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.main)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            if not resume:  # an earlier run's log and summary describe another run
                self.log.path.unlink(missing_ok=True)
                (self.run_dir / "summary.json").unlink(missing_ok=True)

        # models, identical on every rank (weights from explicit generators)
        m = cfg.model
        self.segnet = UNet3D(
            in_channels=1,
            num_classes=self.num_classes,
            base_width=m.base_width,
            depth=m.depth,
            max_width=m.max_width,
            dropout=m.dropout,
            deep_supervision=m.deep_supervision,
            generator=torch.Generator().manual_seed(r.seed),
        ).to(self.device)
        self.adversary = Discriminator3D(
            image_channels=1,
            mask_channels=self.num_classes,
            base_width=m.adv_width,
            depth=m.adv_depth,
            output=m.adv_output,  # type: ignore[arg-type]
            generator=torch.Generator().manual_seed(r.seed + 1),
        ).to(self.device)
        if self.channels_last:
            channels_last_weights(self.segnet)
            channels_last_weights(self.adversary)
        self.segnet_train: nn.Module = D.wrap_ddp(self.segnet, self.dist)
        self.adversary_train: nn.Module = D.wrap_ddp(self.adversary, self.dist)
        if r.compile:
            self.segnet_train = torch.compile(self.segnet_train)  # type: ignore[assignment]
            self.adversary_train = torch.compile(self.adversary_train)  # type: ignore[assignment]
        self.segnet_optimizers: dict[Stage, torch.optim.Optimizer] = {
            stage: torch.optim.AdamW(
                self.segnet.parameters(), lr=stage.lr, weight_decay=stage.weight_decay
            )
            for stage in self.stages
            if stage.trains_segnet
        }
        self.adversary_optimizer: torch.optim.Optimizer = torch.optim.Adam(
            self.adversary.parameters(), lr=cfg.stage2.lr, betas=(0.5, 0.999)
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype is torch.float16
        )
        self.seg_loss: Callable[[Any, Tensor], Tensor] = DeepSupervisionLoss(
            DiceCELoss(batch_dice=m.batch_dice)
        )
        self.state = State()
        self.stopped: str | None = None
        self._interrupted = False
        self._heldout: list[tuple[Tensor, Tensor]] | None = None
        self._live: Iterator[dict[str, Any]] | None = None
        self._live_at: tuple[int, int, int] | None = None
        self._since_check: list[tuple[str, Tensor]] = []
        self.resumed_from: Path | None = None
        if resumed is not None:
            self._restore(*resumed)

    # ------------------------------------------------------------------ small helpers
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 (or fp16) autocast as ``run.amp`` resolved (:func:`amp_dtype`); a no-op
        without it."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def inference_kwargs(self, overlap: float) -> dict[str, Any]:
        """The sliding-window options of this run (``training.evaluation.segment``'s).

        Args:
            overlap: the windows' overlap (``run.gate_overlap`` or ``run.val_overlap``).

        Returns:
            Keyword arguments for ``train_voe``, ``validate`` and ``segment``.
        """
        return {
            "patch_size": tuple(self.cfg.data.patch_size),
            "overlap": overlap,
            "batch_size": self.cfg.run.infer_batch,
            "device": self.device,
            # Windows in the default layout: 15-20% faster than channels_last_3d for
            # inference on the 2-core CPU, whatever layout the weights are in.
            "channels_last": False,
            "autocast": self.amp_dtype is not None,
            "largest_component": self.cfg.run.largest_component,
        }

    def _to_device(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True).long()
        y = self.label_lut[y]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x, y

    def _next_batch(self, stage: Stage) -> dict[str, Any]:
        """The batch at the state's position; the epoch's iterator lives across fit() calls."""
        st = self.state
        if self._live_at != (stage.number, st.epoch, st.batch):
            # resuming mid-epoch: the sample keys make the remaining batches the same
            key = epoch_key(stage.number, st.epoch)
            self._live = iter(self.loader.epoch(key, start_batch=st.batch))
        assert self._live is not None
        batch = next(self._live)
        self._live_at = (stage.number, st.epoch, st.batch + 1)
        return batch

    def heldout(self) -> list[tuple[Tensor, Tensor]]:
        """The adversary's held-out patches (epoch key ``HELDOUT_EPOCH``), on the device."""
        if self._heldout is None:
            self._live_at = None  # the loader runs one epoch at a time
            it = iter(self.loader.epoch(HELDOUT_EPOCH))
            self._heldout = [self._to_device(next(it)) for _ in range(self.heldout_batches)]
        return self._heldout

    def measure_gate(self, stage: Stage) -> dict[str, float]:
        """Measure ``stage``'s gate (and, in stage 2, the frozen segnet's scores).

        Returns:
            ``{"value": ...}`` plus diagnostics: in stage 2 ``segnet_voe`` on the held-out
            patches, and ``train_voe`` with ``stage2.monitor_voe``.
        """
        out: dict[str, float] = {}
        gate: dict[str, Any] = {"classes": self.classes, "gate_class": self.cfg.data.gate_class}
        if stage.metric == "train_voe":
            out["value"] = train_voe(
                self.segnet,
                self.gate_volumes,
                **gate,
                **self.inference_kwargs(self.cfg.run.gate_overlap),
            )
        else:
            scores = heldout_scores(
                self.segnet,
                self.adversary,
                self.heldout(),
                num_classes=self.num_classes,
                autocast=self.autocast,
                **gate,
            )
            out = {"value": scores["accuracy"], "segnet_voe": scores["segnet_voe"]}
            if self.cfg.stage2.monitor_voe:
                out["train_voe"] = train_voe(
                    self.segnet,
                    self.gate_volumes,
                    **gate,
                    **self.inference_kwargs(self.cfg.run.gate_overlap),
                )
        return out

    def _check_losses(self) -> None:
        """Read the losses since the last check (a host-device sync); stop on NaN/inf."""
        if not self._since_check:
            return
        names = [n for n, _ in self._since_check]
        values = torch.stack([v.float() for _, v in self._since_check]).cpu()  # sync point
        self._since_check = []
        bad = float((~torch.isfinite(values)).any())
        bad = float(D.all_reduce_sum(bad))
        if bad:
            last = latest_checkpoint(self.ckpt_dir)
            st = self.state
            raise NonFiniteLossError(
                f"non-finite loss at stage {STAGES[st.stage]!r}, epoch {st.epoch + 1}, "
                f"step {st.step} (losses {dict(zip(names, values.tolist(), strict=True))}); "
                f"stopped without saving. Last good checkpoint: "
                f"{last if last is not None else 'none yet'}. Lower the learning rate "
                "(--set stage1.lr=...) or check the data."
            )
        sums = self.state.sums
        for n, v in zip(names, values.tolist(), strict=True):
            sums[n] = sums.get(n, 0.0) + v
            sums[f"n_{n}"] = sums.get(f"n_{n}", 0.0) + 1

    def _oom(self, stage: Stage, exc: BaseException) -> OutOfMemoryError:
        d = self.cfg.data
        smaller = [
            max(p // 2 // 16 * 16, 16) if p == max(d.patch_size) else p for p in d.patch_size
        ]
        return OutOfMemoryError(
            f"CUDA out of memory in stage {stage.name!r} with data.batch_size={d.batch_size} "
            f"and data.patch_size={list(d.patch_size)} (model.base_width="
            f"{self.cfg.model.base_width}). Lower them, e.g. --set data.batch_size="
            f"{max(d.batch_size // 2, 1)} or "
            f"--set data.patch_size={smaller}. ({exc})"
        )

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupted:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self._interrupted = True

    def _interrupt_requested(self) -> bool:
        return bool(D.all_reduce_sum(float(self._interrupted)))

    # ------------------------------------------------------------------ the loop
    def fit(self, *, stop_after: str | None = None, max_seconds: float | None = None) -> State:
        """Train from the current state to the end of the schedule (or of ``stop_after``).

        Args:
            stop_after: a stage name; return when that stage ends.
            max_seconds: return after the step that exceeds this wall time (timing runs);
                ``self.stopped`` is then ``"time"``.

        Returns:
            The state.

        Raises:
            NonFiniteLossError, OutOfMemoryError, TrainingInterrupted (after saving).
        """
        cfg, st = self.cfg, self.state
        if stop_after is not None and stop_after not in STAGES:
            raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
        deadline = time.perf_counter() + (max_seconds or 0.0)
        self.stopped = None
        seg, adv = self.segnet_train, self.adversary_train  # the DDP / compiled wrappers
        handler = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        bar = None
        try:
            for stage in self.stages[st.stage :]:
                if st.stage_step == 0:
                    self.log.write("stage_start", stage=stage.name, gate=stage.gate, step=st.step)
                with contextlib.ExitStack() as stage_modes:
                    if not stage.trains_segnet:
                        # stage 2: the segnet is frozen for the whole stage (eval mode, no
                        # grads), and any forward pass of it in training mode raises ModeError
                        stage_modes.enter_context(frozen(self.segnet))
                        stage_modes.enter_context(expect_mode(self.segnet, training=False))
                    # the epochs and batches left from where the state stands
                    for _epoch in range(st.epoch, stage.max_epochs):
                        bar = self._bar(stage)
                        for _batch in range(st.batch, stage.steps_per_epoch):
                            # the next batch (the loader works ahead; on CUDA the copy is async)
                            t0 = time.perf_counter()
                            x, y = self._to_device(self._next_batch(stage))
                            t1 = time.perf_counter()
                            upd_seg, upd_adv = stage.updates(st.stage_step)
                            # 1. segnet update (stages 1 and 3): the segnet trains; the
                            #    adversary is frozen (eval mode, no parameter grads) and only
                            #    passes gradients through
                            if upd_seg:
                                self.segnet.train()
                                opt = self.segnet_optimizers[stage]
                                _set_lr(opt, stage.segnet_lr(st.stage_step))
                                with frozen(self.adversary), self.autocast():
                                    out = seg(x)
                                    loss_seg = self.seg_loss(out, y)
                                    loss = loss_seg
                                    if stage.adv_weight > 0:
                                        probs = _first(out).float().softmax(1).to(x.dtype)
                                        loss_gen = generator_loss(self.adversary(x, probs).float())
                                        loss = loss_seg + stage.adv_weight * loss_gen
                                        self._since_check.append(("loss_gen", loss_gen.detach()))
                                opt.zero_grad(set_to_none=True)
                                self.scaler.scale(loss).backward()
                                self.scaler.unscale_(opt)
                                nn.utils.clip_grad_norm_(self.segnet.parameters(), SEGNET_GRAD_CLIP)
                                self.scaler.step(opt)
                                self.scaler.update()
                                st.step += 1
                                self._since_check.append(("loss_seg", loss_seg.detach()))
                            # 2. adversary update (stages 2 and 3): the adversary trains; the
                            #    segnet's masks come from eval mode without autograd
                            if upd_adv:
                                with evaluating(self.segnet), self.autocast():
                                    fake = _first(self.segnet(x)).float().softmax(1)
                                self.adversary.train()
                                opt = self.adversary_optimizer
                                _set_lr(opt, stage.adversary_lr)  # from the config, also on resume
                                with self.autocast():  # real and fake pairs in one forward pass
                                    real = one_hot(y, self.num_classes)
                                    pairs = torch.cat([real, fake]).to(x.dtype)
                                    logits = adv(torch.cat([x, x]), pairs).float()
                                    real_logits, fake_logits = logits.chunk(2)
                                    loss_d = discriminator_loss(real_logits, fake_logits)
                                opt.zero_grad(set_to_none=True)
                                self.scaler.scale(loss_d).backward()
                                self.scaler.step(opt)
                                self.scaler.update()
                                st.step += 1
                                self._since_check.append(("loss_d", loss_d.detach()))
                                self._since_check.append(
                                    ("acc_d", adversary_accuracy(real_logits, fake_logits))
                                )
                            # bookkeeping: loss read-out, timing, checkpoint, interrupt, stop
                            st.batch += 1
                            st.stage_step += 1
                            self._after_batch(stage, int(upd_seg) + int(upd_adv), t0, t1, bar)
                            if cfg.run.max_steps and st.step >= cfg.run.max_steps:
                                self.stopped = "max_steps"
                            elif max_seconds is not None and time.perf_counter() > deadline:
                                self.stopped = "time"
                            if self.stopped:
                                return st
                        bar.close()
                        # end of the epoch: log it, measure the gate when due
                        if self._end_epoch(stage):
                            break
                self._end_stage(stage)
                if stop_after == stage.name:
                    break
            return st
        except torch.OutOfMemoryError as exc:
            raise self._oom(self.stages[min(st.stage, 2)], exc) from None
        finally:
            if bar is not None:
                bar.close()
            if handler is not None:
                signal.signal(signal.SIGINT, handler)

    def _after_batch(self, stage: Stage, updates: int, t0: float, t1: float, bar: Any) -> None:
        """Read the losses when due (a host-device sync), count the time, advance the bar,
        save a checkpoint when due, and stop after saving on SIGINT.

        Args:
            stage: the stage.
            updates: optimizer steps this batch took (1 or 2).
            t0, t1: ``perf_counter`` before and after fetching the batch.
            bar: the epoch's progress bar.
        """
        cfg, st = self.cfg, self.state
        every = cfg.run.checkpoint_every
        ckpt_due = every > 0 and (st.step - updates) // every != st.step // every
        check = (
            st.stage_step % cfg.run.log_every == 0 or ckpt_due or st.batch == stage.steps_per_epoch
        )
        if check:
            self._check_losses()  # host-device sync
        t2 = time.perf_counter()
        st.wait_s[stage.name] = st.wait_s.get(stage.name, 0.0) + (t1 - t0)
        st.compute_s[stage.name] = st.compute_s.get(stage.name, 0.0) + (t2 - t1)
        st.steps[stage.name] = st.steps.get(stage.name, 0) + 1
        self._update_bar(bar)
        if ckpt_due:
            self.save()
        if check and self._interrupt_requested():
            self.save(tag="interrupt")
            raise TrainingInterrupted(
                f"interrupted in stage {stage.name!r}, epoch {st.epoch + 1}, step "
                f"{st.step}; checkpoint saved in {self.ckpt_dir}; continue with --resume"
            )

    def _bar(self, stage: Stage) -> Any:
        st = self.state
        return tqdm(
            total=stage.steps_per_epoch,
            initial=st.batch,
            leave=False,
            dynamic_ncols=True,
            desc=f"{stage.name} {st.epoch + 1}/{stage.max_epochs}",
            disable=not self.progress,
        )

    def _update_bar(self, bar: Any) -> None:
        bar.update()
        s = self.state.sums
        if self.progress and s:
            bar.set_postfix_str(
                " ".join(
                    f"{k}={s[k] / s['n_' + k]:.3f}"
                    for k in ("loss_seg", "loss_d", "acc_d")
                    if s.get("n_" + k)
                ),
                refresh=False,
            )

    def _end_epoch(self, stage: Stage) -> bool:
        """Log the epoch, measure the gate when due; True when the stage is over."""
        st = self.state
        st.epoch += 1
        st.batch = 0
        keys = sorted(k for k in st.sums if not k.startswith("n_") and st.sums.get(f"n_{k}"))
        means = {k: st.sums[k] / st.sums[f"n_{k}"] for k in keys}
        if D.is_distributed() and keys:  # every rank logged the same keys
            reduced = D.all_reduce_mean(torch.tensor([means[k] for k in keys], dtype=torch.float64))
            means = dict(zip(keys, reduced.tolist(), strict=True))  # type: ignore[union-attr]
        st.sums = {}
        record: dict[str, Any] = {"stage": stage.name, "epoch": st.epoch, "step": st.step, **means}
        if not stage.gate_due(st.epoch):
            self.log.write("epoch", **record)
            return False
        gate = self.measure_gate(stage)
        st.gate_value = gate["value"]
        reached = stage.reached(st.gate_value)
        record.update(
            gate=stage.gate,
            reached=reached,
            **{(stage.metric if k == "value" else k): v for k, v in gate.items()},
        )
        self.log.write("gate", **record)
        if self.progress:
            tqdm.write(
                f"[{stage.name}] epoch {st.epoch}/{stage.max_epochs}: "
                + " ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float))
                + f" -> gate {stage.gate}: {'reached' if reached else 'not yet'}"
            )
        return reached or st.epoch >= stage.max_epochs

    def _end_stage(self, stage: Stage) -> None:
        st = self.state
        reached = stage.reached(st.gate_value)
        result = {
            "name": stage.name,
            "gate": stage.gate,
            "value": st.gate_value,
            "reached": bool(reached),
            "epochs": st.epoch,
        }
        if not reached:
            result["capped"] = True
        st.results.append(result)
        self.log.write("stage_end", step=st.step, **result)
        if self.progress:
            verdict = "reached" if reached else f"CAPPED at {stage.max_epochs} epochs"
            tqdm.write(
                f"[{stage.name}] gate {stage.gate}: {verdict} "
                f"(value {st.gate_value:.4f}, {st.epoch} epochs)"
            )
        st.start_stage(st.stage + 1)
        self.save(tag=f"{stage.name}-end")

    def goto(self, stage: str) -> None:
        """Jump to the start of ``stage`` (timing runs; the schedule's results are not
        filled in for the skipped stages)."""
        self.state.start_stage(STAGES.index(stage))

    # ------------------------------------------------------------------ checkpoints
    def _named_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers under their names in a checkpoint: ``segnet<stage number>`` and
        ``adversary``."""
        named = {f"segnet{s.number}": opt for s, opt in self.segnet_optimizers.items()}
        named["adversary"] = self.adversary_optimizer
        return named

    def save(self, *, tag: str = "") -> Path | None:
        """Save a checkpoint (all ranks call this; rank 0 writes).

        Step checkpoints beyond ``run.keep_checkpoints`` are deleted (tagged ones are kept).

        Returns:
            The path on rank 0, else None.
        """
        rng = capture_rng_state()
        rngs: list[Any] = [rng]
        if D.is_distributed():
            rngs = [None] * D.get_world_size()
            dist.all_gather_object(rngs, rng)
        path = None
        if self.main:
            st = self.state
            ckpt = make_checkpoint(
                models={"segnet": self.segnet, "adversary": self.adversary},
                optimizers=self._named_optimizers(),
                scaler=self.scaler,
                stage="done" if st.finished else STAGES[st.stage],
                epoch=st.epoch,
                step=st.step,
                config=to_dict(self.cfg),
                extra={"state": st.as_dict(), "rank_rng": rngs},
            )
            path = save_checkpoint(ckpt, checkpoint_path(self.ckpt_dir, st.step, tag=tag))
            self.log.write(
                "checkpoint",
                path=str(path),
                step=st.step,
                stage=ckpt["stage"],
                epoch=st.epoch,
                batch=st.batch,
            )
            prune_checkpoints(self.ckpt_dir, self.cfg.run.keep_checkpoints)
        D.barrier()
        return path

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Load a checkpoint: weights, optimizers, scaler, this rank's RNG, the state.

        Raises:
            CheckpointError: the file is damaged or not a checkpoint of this trainer.
        """
        self._restore(Path(path), load_checkpoint(path))

    def _restore(self, path: Path, ckpt: dict[str, Any]) -> None:
        for name, model in (("segnet", self.segnet), ("adversary", self.adversary)):
            mismatch = state_dict_mismatch(model, ckpt["models"].get(name, {}))
            if mismatch:
                raise CheckpointError(
                    path,
                    f"its {name} does not fit this run's configuration ({self.num_classes} "
                    f"classes {list(self.classes.names)}, model settings of config.toml): "
                    f"{mismatch}",
                )
        meta = restore_checkpoint(
            ckpt,
            models={"segnet": self.segnet, "adversary": self.adversary},
            optimizers=self._named_optimizers(),
            scaler=self.scaler,
            restore_global_rng=False,
        )
        rngs = meta["extra"].get("rank_rng") or [ckpt["rng"]]
        restore_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0])
        self.state = State.from_dict(meta["extra"]["state"])
        self.resumed_from = path
        st = self.state
        self.log.write(
            "resume",
            path=str(path),
            stage=STAGES[min(st.stage, 2)],
            epoch=st.epoch,
            batch=st.batch,
            step=st.step,
        )

    def close(self) -> None:
        """Stop the loader's workers."""
        self.loader.close()

    # ------------------------------------------------------------------ reporting inputs
    def timing(self) -> dict[str, Any]:
        """Wait / compute seconds and steps per stage, and the overall data-wait fraction."""
        st = self.state
        wait, comp = sum(st.wait_s.values()), sum(st.compute_s.values())
        return {
            "wait_s": dict(st.wait_s),
            "compute_s": dict(st.compute_s),
            "steps": dict(st.steps),
            "data_wait_fraction": wait / (wait + comp) if wait + comp > 0 else 0.0,
        }


def channels_last_weights(model: nn.Module) -> None:
    """``channels_last_3d`` weights, except 1x1x1 kernels: their gradients come back in the
    default layout, which DDP's gradient buckets would otherwise copy and warn about."""
    model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    for p in model.parameters():
        if p.dim() == 5 and p.shape[2:] == (1, 1, 1):
            p.data = p.data.clone(memory_format=torch.contiguous_format)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
