"""``python -m training.run``: generate the data if needed, train all stages, validate, report.

With no arguments it uses the ``gpu`` preset when CUDA is available, else ``cpu``: the
phantom dataset is generated under ``data/phantom`` if absent, the zarr cache is built, the
three stages run with their gates, the validation cases are segmented whole, and
``runs/<name>/`` receives::

    config.toml, config.json   the resolved configuration (``--config`` reads config.toml),
                               with what the data decided: layout, classes, normalisation
    metrics.jsonl              one record per epoch / gate / stage / checkpoint / case
    checkpoints/               ckpt-<step>[-<tag>].pt, atomic, torch.load(weights_only=True)
    val_cases.csv              per case, resolution (native, cache) and class: VoE, Dice,
                               RVD, ASSD, MSD, RMSD
    plots/stages.png           loss and gate metric per epoch, per stage
    plots/augmented.png        a montage of augmented training patches with their labels
    plots/validation.png       validation slices with ground truth and prediction outlines
    summary.json               stages (gate, value, reached, epochs), the classes, the
                               validation means per class at native resolution ("val", the
                               headline) and on the cache grid ("val_cache_grid"), data
                               wait, the final checkpoint

``--data PATH`` trains on a dataset folder instead of the phantom (``data.root = PATH``,
``data.phantom = false``): its layout is detected (MSD / nnU-Net ``dataset.json``, LiTS,
SLIVER07, ``images/`` + ``labels/``; ``--set data.layout=...`` forces one), the classes come
from its labels and the normalisation from its modality, and the run is named
``<folder name>-<preset>`` unless ``--name`` (or ``run.name``) says otherwise.

Each checkpoint has its size and SHA-256 beside it (``<name>.digest``); ``--resume`` checks
them and falls back to the newest intact checkpoint, with a warning naming each damaged one.
``--resume`` of a finished run (its summary names the newest checkpoint) says so and exits.

Examples::

    python -m training.run --preset smoke
    python -m training.run --data /data/Task03_Liver --set data.spacing=[2.0,1.5,1.5]
    python -m training.run --set stage1.max_epochs=20 --set data.patch_size=[64,64,64]
    python -m training.run --config my.toml --name try2
    python -m training.run --resume            # continue the run named by the preset/--name
    torchrun --nproc_per_node=2 -m training.run --preset smoke   # DDP (gloo on CPU)

Exit status: 0 done (or ``--resume`` of a finished run); 2 bad configuration, data or
checkpoint (nothing is trained; settings are checked before any data work); 3 NaN loss or
CUDA out of memory; 130 interrupted (a checkpoint was saved: rerun with ``--resume``).
(argparse's own usage errors also exit 2.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from training import distributed as D
from training.checkpoint import CheckpointError, CheckpointWarning, latest_checkpoint
from training.config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    resolve_config,
)
from training.data import TrainingDataError, epoch_key, load_volumes
from training.evaluation import validate, validation_summary, write_case_csv
from training.report import (
    plot_montage,
    plot_overlays,
    plot_stages,
    read_metrics,
    summary_table,
    write_summary,
)
from training.trainer import NonFiniteLossError, OutOfMemoryError, Trainer, TrainingInterrupted

__all__ = ["finish", "finished_summary", "main", "parse_args", "run_training"]


def _device_name(trainer: Trainer) -> str:
    dev = trainer.device
    world = f", {trainer.dist.world_size} ranks" if trainer.dist.world_size > 1 else ""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)}){world}"
    return f"cpu ({torch.get_num_threads()} threads){world}"


def finish(trainer: Trainer, *, started: float) -> dict[str, Any]:
    """Validate the trained segnet, write the CSV, plots and summary.json (rank 0).

    Args:
        trainer: a trainer whose :meth:`Trainer.fit` completed.
        started: ``time.perf_counter()`` at the start of the run (for the wall time).

    Returns:
        The summary dict (on every rank).
    """
    cfg = trainer.cfg
    classes, gate = trainer.classes, cfg.data.gate_class
    volumes = load_volumes(trainer.dataset, trainer.dataset.val)
    options = trainer.inference_kwargs(cfg.run.val_overlap)
    if trainer.device.type == "cpu":  # float32, as training.predict runs on the CPU
        options["autocast"] = False
    rows, overlays = validate(
        trainer.segnet,
        volumes,
        classes=classes,
        gate_class=gate,
        **options,
    )
    run_dir = trainer.run_dir
    timing = trainer.timing()
    last = latest_checkpoint(trainer.ckpt_dir)
    summary: dict[str, Any] = {
        "stages": [
            {k: r[k] for k in ("name", "gate", "value", "reached", "epochs")}
            for r in trainer.state.results
        ],
        "classes": classes.as_dict(),
        "gate_class": classes.describe(gate),
        **validation_summary(rows, classes, cache_spacing=cfg.data.spacing or None),
        "data_wait_fraction": timing["data_wait_fraction"],
        "device": _device_name(trainer),
        "val_cases": len(volumes),
        "train_cases": len(trainer.dataset.train),
        "steps": trainer.state.step,
        "timing": timing,
        "run_dir": str(run_dir),
        "resumed_from": None if trainer.resumed_from is None else str(trainer.resumed_from),
        "checkpoint": None if last is None else str(last),
    }
    if trainer.main:
        write_case_csv(rows, run_dir / "val_cases.csv")
        for r in rows:
            trainer.log.write("val_case", **r)
        trainer.log.write(
            "val", **{k: summary[k] for k in ("val", "val_cache_grid") if k in summary}
        )
        if cfg.run.plots:
            plots = run_dir / "plots"
            plots.mkdir(exist_ok=True)
            plot_stages(read_metrics(trainer.log.path), plots / "stages.png")
            samples = []
            for i in range(8):  # the first patches of stage 1, as the loader made them
                s = trainer.sampler.sample(epoch_key(1, 0), i)
                samples.append({**s, "title": s["case"]})
            plot_montage(samples, plots / "augmented.png")
            drawn = [
                r for r in rows if r["resolution"] == "cache" and r["class"] == classes.names[gate]
            ]
            plot_overlays(overlays, drawn, plots / "validation.png")
        summary["wall_s"] = time.perf_counter() - started
        write_summary(summary, run_dir / "summary.json")
    return summary


def finished_summary(cfg: Config) -> Path | None:
    """``summary.json`` of the run in ``cfg.run_dir`` if that run finished, else None.

    A run is finished when its summary names the run's newest checkpoint: no training
    happened after the validation that wrote it. (A fresh run in the same folder deletes
    the old summary first.)

    Args:
        cfg: the configuration naming the run.

    Returns:
        The summary's path, or None.
    """
    path = cfg.run_dir / "summary.json"
    try:
        final = json.loads(path.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    last = latest_checkpoint(cfg.run_dir / "checkpoints")
    if not final or last is None or Path(final).name != last.name:
        return None
    return path


def run_training(
    cfg: Config, *, resume: bool | str = False, progress: bool | None = None
) -> dict[str, Any]:
    """Train and validate with ``cfg``; the programmatic form of the CLI.

    Args:
        cfg: the resolved configuration.
        resume: continue from the run folder's latest checkpoint (or this file).
        progress: tqdm bars (default: ``cfg.run.progress``).

    Returns:
        The summary (also written to ``summary.json``).
    """
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        trainer.fit()
        if trainer.stopped:
            return {"stopped": trainer.stopped, "steps": trainer.state.step}
        return finish(trainer, started=t0)
    finally:
        trainer.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Train the segnet + adversary in three gated stages and validate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    p.add_argument(
        "--preset",
        default="auto",
        choices=("auto", "smoke", "cpu", "gpu"),
        help="base configuration (auto: gpu with CUDA, else cpu)",
    )
    p.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="train on this dataset folder (MSD / nnU-Net, LiTS, SLIVER07 or images/ + "
        "labels/; the layout is detected) instead of the phantom",
    )
    p.add_argument("--config", type=Path, help="TOML file on top of the preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. stage1.lr=1e-3 or data.patch_size=[64,64,64] "
        "(TOML values; repeatable)",
    )
    p.add_argument("--name", help="run name (runs/<name>); same as --set run.name=...")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run from its latest checkpoint (its saved config.toml "
        "is the base; --set still applies)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.data is not None:
        # before the user's --set values, which win
        overrides[:0] = [f"data.root={json.dumps(str(args.data))}", "data.phantom=false"]
    if args.name:
        overrides.append(f'run.name="{args.name}"')
    if args.device:
        overrides.append(f'run.device="{args.device}"')
    if args.no_progress:
        overrides.append("run.progress=false")
    cfg = resolve_config(preset=args.preset, path=args.config, overrides=overrides)
    if args.data is not None and not args.name and cfg.run.name in _PRESET_NAMES:
        # a dataset's run is named after it, so it does not replace the phantom's
        name = f"{_folder_name(args.data)}-{cfg.run.name}"
        cfg = apply_overrides(cfg, [f"run.name={json.dumps(name)}"]).validate()
    saved = cfg.run_dir / "config.toml"
    if args.resume and saved.exists():
        cfg = apply_overrides(load_config(saved), overrides).validate()
    return cfg


_PRESET_NAMES = {p.get("run", {}).get("name", "cpu") for p in PRESETS.values()}


def _folder_name(path: Path) -> str:
    """A run-name-safe form of a dataset folder's name."""
    name = Path(os.path.abspath(path)).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._-") or "data"


@contextmanager
def _checkpoint_warnings_as_lines() -> Iterator[None]:
    """Show a skipped checkpoint as one ``warning: ...`` line on stderr (no source line)."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, CheckpointWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = parse_args(argv)
    main_rank = True
    try:
        cfg = _config(args)
        done = finished_summary(cfg) if args.resume else None
        if done is not None:
            print(
                f"run {cfg.run_dir} is finished (all stages trained and validated); its "
                f"summary is {done}. Nothing to resume: start another run with --name, or "
                "leave out --resume to train this one again."
            )
            print(summary_table(json.loads(done.read_text())))
            return 0
        with _checkpoint_warnings_as_lines():
            summary = run_training(cfg, resume=args.resume)
        main_rank = D.is_main()
    except (ConfigError, TrainingDataError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, OutOfMemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except TrainingInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    finally:
        D.cleanup()
    if main_rank and "stages" in summary:
        print(summary_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
