"""The Triton kernel against the numba path.

- Under ``TRITON_INTERPRET=1`` on tiny CPU tensors, in a subprocess (the interpreter is
  chosen when triton is imported); the numba references are computed here and exchanged
  through an ``.npz``. Skipped where triton is not installed.
- Compiled for sm_90 without a GPU (the real compiler's type checks), where triton and its
  bundled ptxas are installed.
- On a CUDA device (marker ``gpu``): the compiled kernel, Compose on CUDA tensors.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import augment
from augment import matrices as mx
from augment.backends.numpy import onehot_linear_numpy, warp_numpy
from augment.kernels import program as pg
from augment.kernels import torch_fallback as tk
from augment.rng import batch_rngs

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
REL = 1e-5
ROOT = Path(__file__).resolve().parents[2]


def random_matrix(rng, out_shape, in_shape, *, border=False, degrees=30.0):
    lin = (
        mx.rotation(np.deg2rad(rng.uniform(-degrees, degrees, 3)))
        @ mx.scaling(rng.uniform(0.8, 1.25, 3))
        @ mx.shear(rng.uniform(-0.1, 0.1, 6))
    )
    shift = rng.uniform(-2.0, 2.0, 3)
    if border:
        shift += rng.choice([-1, 1], 3) * np.asarray(in_shape) * 0.45
    return mx.to_3x4(mx.about(lin, mx.centre(out_shape), mx.centre(in_shape) + shift))


def full_program(seed):
    return pg.concat(
        pg.op(pg.CLIP, -2.0, 2.5),
        pg.op(pg.AFFINE, 0.4, 0.6),
        pg.op(pg.GAMMA, 1.4, 0.0, 1.5),
        pg.op(pg.NOISE, 0.05, seed),
    )


def rel_err(got, ref):
    g = np.asarray(got, dtype=np.float64)
    return float(np.abs(g - ref).max() / max(np.abs(ref).max(), 1e-30))


# -- interpreter -----------------------------------------------------------------------------
def interpreter_cases():
    """Inputs and numba references; every case is one Triton launch in the subprocess."""
    rng = np.random.default_rng(0)
    cases = {}
    # a: batch, 2 channels + uint8 label, border and interior tiles, all opcodes, EVEN tiles
    out_a, in_a = (3, 8, 16), (22, 24, 28)
    img = rng.normal(size=(3, 2, *in_a)).astype(np.float32)
    lab = rng.integers(0, 4, (3, 1, *in_a)).astype(np.uint8)
    m = np.stack([random_matrix(rng, out_a, in_a, border=b == 2, degrees=8) for b in range(3)])
    m[1] = mx.to_3x4(mx.translation([4, 3, 5]) @ mx.flip([True, False, True], out_a))
    prog = np.stack([full_program(11 + 2**31 * b) for b in range(3)])
    refs = [
        warp_numpy(img[b], lab[b], m[b], out_a, cval=-0.75, label_cval=5, program=prog[b])
        for b in range(3)
    ]
    exact, _ = warp_numpy(img[1], None, m[1], out_a, cval=-0.75)
    cases["a"] = dict(
        img=img,
        lab=lab,
        m=m,
        prog=prog,
        out=np.array(out_a),
        ref_exact=exact,
        ref_img=np.stack([r[0] for r in refs]),
        ref_lab=np.stack([r[1] for r in refs]),
    )
    # b: list of sizes, int16 image and label, nearest image, ragged output tiles
    out_b = (2, 5, 9)
    shapes = [(9, 10, 11), (12, 7, 8)]
    imgs = [(rng.normal(size=(1, *s)) * 300).astype(np.int16) for s in shapes]
    labs = [rng.integers(-1, 3, (1, *s)).astype(np.int16) for s in shapes]
    m = np.stack([random_matrix(rng, out_b, s, border=True) for s in shapes])
    refs = [
        warp_numpy(
            imgs[b].astype(np.float32), labs[b], m[b], out_b, image_order=0, cval=3.0, label_cval=-7
        )
        for b in range(2)
    ]
    cases["b"] = dict(
        img0=imgs[0],
        img1=imgs[1],
        lab0=labs[0],
        lab1=labs[1],
        m=m,
        out=np.array(out_b),
        ref_img=np.stack([r[0] for r in refs]),
        ref_lab=np.stack([r[1] for r in refs]),
    )
    # c: float16 source, one-hot linear labels, bfloat16 output
    out_c, in_c = (2, 6, 7), (8, 9, 10)
    img = rng.normal(size=(2, 1, *in_c)).astype(np.float16)
    lab = rng.integers(0, 3, (2, 1, *in_c)).astype(np.uint8)
    m = np.stack([random_matrix(rng, out_c, in_c, border=b == 1) for b in range(2)])
    cases["c"] = dict(
        img=img,
        lab=lab,
        m=m,
        out=np.array(out_c),
        ref_img=np.stack(
            [
                warp_numpy(img[b].astype(np.float32), None, m[b], out_c, cval=1.0)[0]
                for b in range(2)
            ]
        ),
        ref_lab=np.stack([onehot_linear_numpy(lab[b], m[b], out_c, 0) for b in range(2)]),
    )
    return cases


SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from augment.kernels import triton_warp as trw

    data = dict(np.load(sys.argv[1]))
    def case(name):
        return {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith(name + "/")}
    res = {}
    a = case("a")
    img, lab = trw.warp_batch(torch.from_numpy(a["img"]), torch.from_numpy(a["lab"]), a["m"],
                              tuple(a["out"]), cval=-0.75, label_cval=5, programs=a["prog"],
                              config=(8, 16, 1))
    res["a/img"], res["a/lab"] = img.numpy(), lab.numpy()
    img, _ = trw.warp_batch(torch.from_numpy(a["img"]), None, a["m"], tuple(a["out"]),
                            cval=-0.75, config=(4, 16, 1, 1))
    res["a/img_only"] = img.numpy()
    _, lab = trw.warp_batch(None, torch.from_numpy(a["lab"]), a["m"], tuple(a["out"]),
                            label_cval=5, config=(8, 8, 1))
    res["a/lab_only"] = lab.numpy()
    b = case("b")
    img, lab = trw.warp_batch([torch.from_numpy(b["img0"]), torch.from_numpy(b["img1"])],
                              [torch.from_numpy(b["lab0"]), torch.from_numpy(b["lab1"])],
                              b["m"], tuple(b["out"]), image_order=0, cval=3.0, label_cval=-7,
                              config=(4, 8, 1))
    res["b/img"], res["b/lab"] = img.numpy(), lab.numpy()
    c = case("c")
    img, lab = trw.warp_batch(torch.from_numpy(c["img"]), torch.from_numpy(c["lab"]), c["m"],
                              tuple(c["out"]), cval=1.0, out_dtype=torch.bfloat16,
                              label_mode="linear_onehot", classes=torch.tensor([0, 1, 2]),
                              config=(8, 8, 1))
    res["c/img"], res["c/lab"] = img.float().numpy(), lab.numpy()
    np.savez(sys.argv[2], **res)
""")


@pytest.mark.skipif(
    not HAS_TRITON,
    reason="triton is not installed: the Triton kernel cannot "
    "be interpreted here (the torch path is tested)",
)
def test_triton_kernel_under_the_interpreter(tmp_path):
    cases = interpreter_cases()
    flat = {f"{n}/{k}": v for n, c in cases.items() for k, v in c.items()}
    np.savez(tmp_path / "in.npz", **flat)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = dict(np.load(tmp_path / "out.npz"))
    a, b, c = cases["a"], cases["b"], cases["c"]
    assert rel_err(got["a/img"], a["ref_img"]) < REL
    assert np.array_equal(got["a/lab"], a["ref_lab"])
    assert np.array_equal(got["a/img_only"][1], a["ref_exact"])  # an exact map, bit for bit
    assert np.array_equal(got["a/lab_only"], a["ref_lab"])
    assert np.array_equal(got["b/img"], b["ref_img"])
    assert np.array_equal(got["b/lab"], b["ref_lab"])
    bf = torch.from_numpy(c["ref_img"]).to(torch.bfloat16).float().numpy()
    assert np.abs(got["c/img"] - bf).max() <= 2.0**-7 * np.abs(bf).max()
    assert (got["c/lab"] == c["ref_lab"]).mean() >= 0.99


# -- compile for sm_90 without a GPU -----------------------------------------------------------
def _compile(**kw):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from augment.kernels.triton_warp import warp_kernel

    sig = {
        "img_ptr": kw.pop("img", "*fp32"),
        "lab_ptr": kw.pop("lab", "*u8"),
        "out_img_ptr": kw.pop("out", "*fp32"),
        "out_lab_ptr": "*u8",
        "meta_ptr": "*i64",
        "cls_ptr": "*i64",
        "fld_ptr": "*fp32",
        "od": "i32",
        "oh": "i32",
        "ow": "i32",
        "ow_s": "i32",
        "tiles_y": "i32",
        "tiles_x": "i32",
        "meta_stride": "i32",
        "cval": "fp32",
        "lcval": "i32",
    }
    consts = {
        "NC": 1,
        "NL": 1,
        "N_OPS": 0,
        "LINEAR": True,
        "LAB_ONEHOT": False,
        "N_CLS": 0,
        "TY": 2,
        "TX": 64,
        "EVEN": True,
        "VEC": False,
        "ELASTIC": False,
        **kw,
    }
    sig.update({k: "constexpr" for k in consts})
    try:
        src = ASTSource(fn=warp_kernel, signature=sig, constexprs=consts)
        target = GPUTarget("cuda", 90, 32)
    except TypeError as e:  # another triton's compile API
        pytest.skip(f"this triton's ASTSource API differs: {e}")
    return triton.compile(src, target=target, options={"num_warps": 4})


@pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
    reason="triton is not installed (or is interpreting)",
)
def test_triton_kernel_compiles_for_sm90():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # pragma: no cover - builds without the NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is unavailable: {e}")
    for kw in (
        {},
        {"out": "*bf16", "TY": 16, "TX": 32, "VEC": True},
        {"img": "*i16", "lab": "*i16", "N_OPS": 4, "EVEN": False},
        {"img": "*bf16", "NC": 2, "NL": 0, "LINEAR": False, "N_OPS": 2},
        {"img": "*fp16", "LAB_ONEHOT": True, "N_CLS": 3},
        {"ELASTIC": True, "N_OPS": 4, "EVEN": False},
        {"ELASTIC": True, "LAB_ONEHOT": True, "N_CLS": 2, "TY": 16, "TX": 32},
    ):
        compiled = _compile(**dict(kw))
        assert "cubin" in compiled.asm


# -- on a GPU ----------------------------------------------------------------------------------
# The one set of device correctness checks: ``benchmarks/device_check.py`` runs these (pytest
# on the ``gpu`` marker) before it times anything. ``backend="torch"`` is the fallback on the
# device. Tolerances: float32 relative error (max |diff| / max |ref|, padding included)
# < 1e-5; labels >= 99.99% equal (a coordinate within ~1e-9 of a rounding boundary may go
# either way between float64 paths).
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEV = torch.device("cuda")
LABELS = 0.9999


def agree(got, ref) -> float:
    return float((np.asarray(got) == np.asarray(ref)).mean())


def device_batch(rng, b, in_shape, out_shape, dtype=torch.float32):
    """``b`` random images (float32 values, cast to ``dtype``) and uint8 labels on the
    device, pull maps (odd samples hang over a border) and full programs."""
    img = (rng.normal(size=(b, 1, *in_shape)) * 100).astype(np.float32)
    lab = rng.integers(0, 5, (b, 1, *in_shape)).astype(np.uint8)
    m = np.stack([random_matrix(rng, out_shape, in_shape, border=i % 2 == 1) for i in range(b)])
    prog = np.stack([full_program(3 + 2**31 * i) for i in range(b)])
    img_t = torch.from_numpy(img).to(dtype).to(DEV)
    return img_t, torch.from_numpy(lab).to(DEV), m, prog


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int16])
def test_cuda_kernel_matches_numba(dtype, backend):
    from augment.backends.torch import triton_available, warp_torch

    assert triton_available() or backend == "torch"
    rng = np.random.default_rng(1)
    in_shape, out_shape = (40, 48, 52), (24, 32, 40)
    src, lab, m, prog = device_batch(rng, 4, in_shape, out_shape, dtype)
    img, out_lab = warp_torch(src, lab, m, out_shape, cval=-4.0, programs=prog, backend=backend)
    plain, _ = warp_torch(src, None, m, out_shape, cval=-4.0, backend=backend)
    bf, _ = warp_torch(
        src, None, m, out_shape, cval=-4.0, programs=prog, out_dtype=torch.bfloat16, backend=backend
    )
    for b in range(4):
        host = src[b].float().cpu().numpy()
        ref, ref_lab = warp_numpy(
            host, lab[b].cpu().numpy(), m[b], out_shape, cval=-4.0, program=prog[b]
        )
        assert rel_err(img[b].cpu().numpy(), ref) < REL
        assert agree(out_lab[b].cpu().numpy(), ref_lab) >= LABELS
        assert rel_err(bf[b].float().cpu().numpy(), ref) < 2.0**-7  # bfloat16 keeps 8 bits
        ref_plain, _ = warp_numpy(host, None, m[b], out_shape, cval=-4.0)
        assert rel_err(plain[b].cpu().numpy(), ref_plain) < REL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_list_of_sizes_matches_numba(backend):
    from augment.backends.torch import warp_torch

    rng = np.random.default_rng(4)
    out_shape = (20, 24, 28)
    shapes = [(30, 36, 41), (36, 27, 32), (33, 40, 36)]
    imgs = [(rng.normal(size=(1, *s)) * 50).astype(np.float32) for s in shapes]
    labs = [rng.integers(0, 4, (1, *s)).astype(np.uint8) for s in shapes]
    m = np.stack([random_matrix(rng, out_shape, s, border=i == 2) for i, s in enumerate(shapes)])
    prog = np.stack([full_program(7 + i) for i in range(3)])
    out, out_lab = warp_torch(
        [torch.from_numpy(x).to(DEV) for x in imgs],
        [torch.from_numpy(x).to(DEV) for x in labs],
        m,
        out_shape,
        cval=-3.5,
        programs=prog,
        backend=backend,
    )
    for i in range(3):
        ref, ref_lab = warp_numpy(imgs[i], labs[i], m[i], out_shape, cval=-3.5, program=prog[i])
        assert rel_err(out[i].cpu().numpy(), ref) < REL
        assert agree(out_lab[i].cpu().numpy(), ref_lab) >= LABELS


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_nearest_image_and_label_fill(backend):
    from augment.backends.torch import warp_torch

    rng = np.random.default_rng(5)
    in_shape, out_shape = (30, 34, 38), (20, 22, 24)
    src, lab, m, _ = device_batch(rng, 3, in_shape, out_shape)
    out, out_lab = warp_torch(
        src, lab, m, out_shape, image_order=0, cval=-3.5, label_cval=7, backend=backend
    )
    fills = 0
    for b in range(3):
        ref, ref_lab = warp_numpy(
            src[b].cpu().numpy(),
            lab[b].cpu().numpy(),
            m[b],
            out_shape,
            image_order=0,
            cval=-3.5,
            label_cval=7,
        )
        assert agree(out[b].cpu().numpy(), ref) >= LABELS
        assert agree(out_lab[b].cpu().numpy(), ref_lab) >= LABELS
        fills += int((ref_lab == 7).sum())
    assert fills > 0  # the border sample reads the fill


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_onehot_labels_match_numpy(backend):
    from augment.backends.torch import warp_torch

    rng = np.random.default_rng(6)
    in_shape, out_shape = (24, 26, 28), (16, 18, 20)
    _, lab, m, _ = device_batch(rng, 2, in_shape, out_shape)
    lab = lab.clamp(max=2)
    _, out_lab = warp_torch(None, lab, m, out_shape, label_mode="linear_onehot", backend=backend)
    for b in range(2):
        ref = onehot_linear_numpy(lab[b].cpu().numpy(), m[b], out_shape, 0)
        assert agree(out_lab[b].cpu().numpy(), ref) >= 0.999  # ties may round either way


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_exact_flip_in_a_mixed_batch_is_bit_identical(backend):
    from augment.backends.torch import warp_torch

    rng = np.random.default_rng(7)
    in_shape = (20, 22, 24)
    src, lab, m, _ = device_batch(rng, 2, in_shape, in_shape)
    m[1] = mx.to_3x4(mx.flip([True, False, True], in_shape))
    out, out_lab = warp_torch(src, lab, m, in_shape, backend=backend)
    assert np.array_equal(out[1].cpu().numpy(), np.flip(src[1].cpu().numpy(), (1, 3)))
    assert np.array_equal(out_lab[1].cpu().numpy(), np.flip(lab[1].cpu().numpy(), (1, 3)))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_matches_scipy_float64(backend):
    import scipy.ndimage as ndi

    from augment.backends.torch import warp_torch

    rng = np.random.default_rng(8)
    in_shape, out_shape = (30, 34, 38), (20, 22, 24)
    src, _, m, _ = device_batch(rng, 2, in_shape, out_shape)
    out, _ = warp_torch(src, None, m, out_shape, cval=-3.5, backend=backend)
    for b in range(2):
        ref = ndi.affine_transform(
            src[b, 0].cpu().numpy().astype(np.float64),
            mx.to_4x4(m[b]),
            output_shape=out_shape,
            order=1,
            mode="grid-constant",
            cval=-3.5,
            prefilter=False,
        )
        assert rel_err(out[b, 0].cpu().numpy(), ref) < REL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_compose_matches_numpy(backend):
    rng = np.random.default_rng(2)
    shapes = [(30, 34, 38), (28, 40, 32), (36, 30, 30)]
    imgs = [rng.normal(0, 150, (1, *s)).astype(np.float32) for s in shapes]
    labs = [rng.integers(0, 3, (1, *s)).astype(np.uint8) for s in shapes]
    aug = augment.Compose(
        [
            augment.RandomCrop((20, 24, 28), foreground=0.5),
            augment.RandomAffine(degrees=15, scale=(0.85, 1.25)),
            augment.RandomFlip(p=0.5),
            augment.Window(-200, 250),
            augment.RandomGamma((0.7, 1.5), p=0.5),
            augment.RandomNoise(0.1, p=0.5),
            augment.RandomContrast(p=0.5),
        ]
    )
    out = aug(
        image=[torch.from_numpy(i).to(DEV) for i in imgs],
        label=[torch.from_numpy(lab).to(DEV) for lab in labs],
        rng=batch_rngs(0, 0, range(3)),
        backend=backend,
    )
    rngs = batch_rngs(0, 0, range(3))
    for b in range(3):
        ref = aug(image=imgs[b], label=labs[b], rng=rngs[b])
        assert out["params"].take(b).as_dict() == ref["params"].as_dict()
        assert rel_err(out["image"][b].cpu().numpy(), ref["image"]) < REL
        assert agree(out["label"][b].cpu().numpy(), ref["label"]) >= LABELS


@pytest.mark.gpu
@gpu
def test_cuda_fallback_matches_kernel():
    from augment.backends.torch import warp_torch

    rng = np.random.default_rng(3)
    src = torch.from_numpy(rng.normal(size=(2, 1, 20, 22, 24)).astype(np.float32)).to(DEV)
    m = np.stack([random_matrix(rng, (12, 12, 12), (20, 22, 24)) for _ in range(2)])
    a, _ = warp_torch(src, None, m, (12, 12, 12), backend="triton")
    b, _ = tk.warp_batch(src, None, m, (12, 12, 12))
    assert rel_err(a.cpu().numpy(), b.cpu().numpy().astype(np.float64)) < REL
