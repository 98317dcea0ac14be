"""``python -m benchmarks.gallery [--out DIR]``: every transform of ``augment`` on a phantom.

Renders one PNG per transform (the middle axial slice before and after, the label's
outline on both) and a Markdown page listing them with the settings and the parameters
that were drawn, into ``docs/gallery/`` by default. The phantom is case 0 of
``loaders.phantom`` (80x160x160, seed 0) and every transform draws from a fixed seed, so
the page only changes when a transform does.

Spatial transforms run alone on the CT in HU (shown with the window -200..250 HU);
intensity transforms run after ``Window(-200, 250)`` and are compared with that window
alone (both shown on [0, 1]), so a brightness or gamma change is visible as such.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import augment

OUT = Path("docs", "gallery")
SEED = 0
HU = (-200.0, 250.0)


@dataclass(frozen=True)
class Entry:
    """One gallery item: the transform, how it is written, what it shows."""

    name: str
    code: str
    make: Callable[[], Any]
    blurb: str
    intensity: bool = False
    context: bool = False  # TargetCrop: the liver as its target


def entries() -> list[Entry]:
    a = augment
    return [
        Entry(
            "RandomCrop",
            "augment.RandomCrop((64, 112, 112), foreground=1.0)",
            lambda: a.RandomCrop((64, 112, 112), foreground=1.0),
            "A patch around a foreground voxel (class-balanced); uniform placement otherwise.",
        ),
        Entry(
            "TargetCrop",
            "augment.TargetCrop(64, bound_size=8, scale=(0.75, 1.25))",
            lambda: a.TargetCrop(64, bound_size=8, scale=(0.75, 1.25)),
            "DSB2017's target-centred crop (the target here: the liver's centre and "
            "equal-volume diameter): zoom, rotation, swap and flips folded into one matrix.",
            context=True,
        ),
        Entry(
            "RandomAffine",
            "augment.RandomAffine(degrees=15, scale=(0.85, 1.25))",
            lambda: a.RandomAffine(degrees=15, scale=(0.85, 1.25)),
            "Rotation about each axis and isotropic scaling about the centre, one pass.",
        ),
        Entry(
            "RandomFlip",
            "augment.RandomFlip(axes=(1, 2), p=1.0)",
            lambda: a.RandomFlip(axes=(1, 2), p=1.0),
            "Mirroring: an exact index copy, bit-identical to np.flip.",
        ),
        Entry(
            "RandomRot90",
            "augment.RandomRot90(axes=(1, 2), ks=(1,))",
            lambda: a.RandomRot90(axes=(1, 2), ks=(1,)),
            "Quarter turns in a plane: an exact index copy (np.rot90).",
        ),
        Entry(
            "RandomSwapAxes",
            "augment.RandomSwapAxes(axes=(1, 2))",
            lambda: a.RandomSwapAxes(axes=(1, 2)),
            "A random permutation of equal-sized axes (DSB2017's swap): an exact copy.",
        ),
        Entry(
            "RandomElastic",
            "augment.RandomElastic(points=7, magnitude=(5.0, 6.0))",
            lambda: a.RandomElastic(points=7, magnitude=(5.0, 6.0)),
            "Random control vectors on a 7^3 grid, a cubic B-spline between, evaluated "
            "inside the resampling pass (exaggerated here; W7 uses up to 4 voxels).",
        ),
        Entry(
            "Window",
            "augment.Window(-200, 250)",
            lambda: a.Window(-200, 250),
            "Clip to [-200, 250] HU and map onto [0, 1] (fused into the pass). Before: the "
            "raw HU, shown -1024..1500.",
        ),
        Entry(
            "Normalize",
            "augment.Normalize('zscore', mean=60.0, std=120.0, clip=(-200.0, 250.0))",
            lambda: a.Normalize("zscore", mean=60.0, std=120.0, clip=(-200.0, 250.0)),
            "nnU-Net's CT scheme: clip, then z-score with dataset statistics (fused). "
            "Before: the raw HU, -1024..1500; after: -3..3.",
        ),
        Entry(
            "RandomGamma",
            "augment.RandomGamma((0.5, 0.5), p=1.0)",
            lambda: a.RandomGamma((0.5, 0.5), p=1.0),
            "Gamma on the known value range (fused after the window).",
            intensity=True,
        ),
        Entry(
            "RandomNoise",
            "augment.RandomNoise((0.08, 0.08), p=1.0)",
            lambda: a.RandomNoise((0.08, 0.08), p=1.0),
            "Additive Gaussian noise from a counter-based generator (fused; the same "
            "numbers on every backend).",
            intensity=True,
        ),
        Entry(
            "RandomContrast",
            "augment.RandomContrast((1.5, 1.5), p=1.0)",
            lambda: a.RandomContrast((1.5, 1.5), p=1.0),
            "Contrast about the patch mean, range preserved (after the warp).",
            intensity=True,
        ),
        Entry(
            "RandomBrightness",
            "augment.RandomBrightness((1.3, 1.3), p=1.0)",
            lambda: a.RandomBrightness((1.3, 1.3), p=1.0),
            "Multiplicative brightness (fused).",
            intensity=True,
        ),
        Entry(
            "RandomGaussianBlur",
            "augment.RandomGaussianBlur((1.5, 1.5), p=1.0)",
            lambda: a.RandomGaussianBlur((1.5, 1.5), p=1.0),
            "Separable Gaussian blur after the warp (scipy's gaussian_filter).",
            intensity=True,
        ),
        Entry(
            "RandomLowResolution",
            "augment.RandomLowResolution((0.35, 0.35), p=1.0)",
            lambda: a.RandomLowResolution((0.35, 0.35), p=1.0),
            "nnU-Net's simulated low resolution: nearest down, linear up, after the warp.",
            intensity=True,
        ),
        Entry(
            "RandomBiasField",
            "augment.RandomBiasField(0.6, order=3, p=1.0)",
            lambda: a.RandomBiasField(0.6, order=3, p=1.0),
            "TorchIO's smooth multiplicative polynomial field, after the warp.",
            intensity=True,
        ),
    ]


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """Case 0 of the phantom: float32 HU and its uint8 label (0, liver 1, tumours 2)."""
    from loaders.phantom import generate_case

    img, lab, _ = generate_case(SEED, shape="default")
    return img.astype(np.float32), lab


def liver_target(lab: np.ndarray) -> np.ndarray:
    """``(z, y, x, d)``: the liver's centroid and equal-volume diameter, in voxels."""
    pts = np.argwhere(lab >= 1)
    d = (6.0 * len(pts) / np.pi) ** (1.0 / 3.0)
    return np.array([*pts.mean(axis=0), d])


def summary(params: Any) -> dict[str, str]:
    """A transform's drawn parameters, short: small arrays in full, big ones by shape."""
    out = {}
    for key, value in params.as_dict().items():
        arr = np.asarray(value)
        if arr.size <= 12:
            out[key] = np.array2string(
                np.round(arr.astype(float), 3) if arr.dtype != bool else arr, separator=", "
            )
        else:
            out[key] = f"{arr.shape} array, largest |value| {np.abs(arr).max():.2f}"
    return out


def render(
    path: Path,
    before: np.ndarray,
    after: np.ndarray,
    lab_before: np.ndarray,
    lab_after: np.ndarray,
    ranges: tuple[tuple[float, float], tuple[float, float]],
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), dpi=80)
    for ax, img, lab, (lo, hi), label in zip(
        axes, (before, after), (lab_before, lab_after), ranges, ("before", "after"), strict=True
    ):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        for k, colour in ((1, "tab:orange"), (2, "tab:red")):
            if (lab >= k).any() and (lab < k).any():
                ax.contour(lab >= k, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def make(out: Path) -> list[Path]:
    """Render every entry into ``out`` and write ``out/README.md``; the files written."""
    img, lab = phantom()
    target = liver_target(lab)
    window = augment.Window(*HU)
    written: list[Path] = []
    lines = [
        "# Transform gallery",
        "",
        "Every transform of `augment` on the middle axial slice of the phantom (case 0 of "
        "`loaders.phantom`, 80x160x160), before and after, with the liver (orange) and "
        "tumour (red) outlines of the label. Made by `python -m benchmarks.gallery`; each "
        f"transform draws from `numpy.random.default_rng({SEED})`.",
        "",
    ]
    for e in entries():
        t = e.make()
        if e.intensity:
            aug = augment.Compose([window, t])
            base = augment.Compose([window])(image=img, rng=np.random.default_rng(SEED))["image"]
            ranges = ((0.0, 1.0), (0.0, 1.0))
        else:
            aug = augment.Compose([t], cval=-1024.0)
            base = img
            ranges = (HU, HU)
        if e.name in ("Window", "Normalize"):
            ranges = ((-1024.0, 1500.0), (0.0, 1.0) if e.name == "Window" else (-3.0, 3.0))
        rng = np.random.default_rng(SEED)
        if e.context:
            res = aug(image=img, label=lab, rng=rng, target=target)
        else:
            res = aug(image=img, label=lab, rng=rng)
        after, lab_after = res["image"], res["label"]
        png = out / f"{e.name}.png"
        render(
            png,
            base[base.shape[0] // 2],
            after[after.shape[0] // 2],
            lab[lab.shape[0] // 2],
            lab_after[lab_after.shape[0] // 2],
            ranges,
            e.name,
        )
        written.append(png)
        params = res["params"]
        drawn = params.intensity[-1] if params.intensity else params.spatial[0]
        lines += [f"## {e.name}", "", e.blurb, "", "```python", e.code, "```", ""]
        lines += [f"![{e.name}]({png.name})", "", "Drawn parameters:", ""]
        lines += [f"- `{k}`: {v}" for k, v in summary(drawn).items()]
        lines.append("")
    page = out / "README.md"
    page.write_text("\n".join(lines))
    return [page, *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gallery", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder (default {OUT})")
    args = parser.parse_args(argv)
    written = make(args.out)
    print(f"wrote {len(written)} files to {args.out}: {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
