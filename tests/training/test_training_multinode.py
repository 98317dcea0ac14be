"""Two nodes on loopback: ``torchrun --nnodes=2 --rdzv-backend=c10d`` launched twice, both
reading the volume cache from moto's S3 server on 127.0.0.1, run the smoke preset to the end
with the gates and checkpoints of one process with twice the batch (gloo on CPU).

The cache is built to ``s3://`` first (``data.cache=s3://...``, endpoint and dummy
credentials in ``AWS_*``); each node then gets its own S3 endpoint (a recording proxy in
front of the same server), working folder, staging folder and runs folder, as on two
machines, so the test sees that both nodes read the cache over S3, that nothing is uploaded
again, and that only global rank 0 writes a run folder. (c10d assigns the global ranks, so
either node may be rank 0; the dataset folder, needed by rank 0 only, is the shared one.)

One process with twice the per-rank batch and twice the per-rank held-out pairs is the
reference: rank r takes sample indices ``i * 2 + r``, so the ranks' batches together are its
batches. As in test_training_ddp.py, per-sample Dice (``model.batch_dice=false``) makes the
batch loss the mean of the halves', and a third of the patches are centred on the liver.
The summation order of two ranks differs from one process's, so the comparison has a
tolerance; measured here: gate values within 3e-5, networks within 0.2 % (relative L2 over
all weights). Biases in front of an instance norm get no true gradient, only rounding noise,
which Adam scales up to learning-rate-sized steps (up to 11 % of such a bias); the outputs
do not depend on them, so only the whole network's norm is compared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import torch
from ddp_helpers import free_port

from loaders.remote_server import DUMMY_AWS_ENV, LocalS3Server, RecordingProxy
from training.config import resolve_config
from training.data import prepare_dataset

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "model.batch_dice=false",
    "data.foreground=0.33",
    "run.threads=1",
    'run.name="smoke"',
]
GATE_TOL = 1e-3
WEIGHT_TOL = 1e-2


def aws_env(endpoint: str, staging: Path) -> dict[str, str]:
    """This environment without the machine's AWS set-up, pointed at ``endpoint``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(DUMMY_AWS_ENV, AWS_ENDPOINT_URL=endpoint, XDG_CACHE_HOME=str(staging))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def set_args(overrides: list[str]) -> list[str]:
    return [a for item in overrides for a in ("--set", item)]


def relative_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / den) ** 0.5


def manifest_cases(client: Any, bucket: str) -> dict[str, Any]:
    """Case id -> manifest entry (folder, fingerprint, ...) of the cache in ``bucket``."""
    body = client.get_object(Bucket=bucket, Key="smoke.zarr/zarr.json")["Body"].read()
    return dict(json.loads(body)["attributes"]["voxaug_cache"]["cases"])


def checkpoints(run: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: torch.load(p, weights_only=True) for p in sorted((run / "checkpoints").glob("*.pt"))
    }


def test_two_nodes_over_s3_train_as_one_process_with_twice_the_batch(
    smoke_data, smoke_sets, tmp_path, monkeypatch
):
    with LocalS3Server() as server, RecordingProxy(server.endpoint) as p0:
        with RecordingProxy(server.endpoint) as p1:
            bucket = f"b-{uuid.uuid4().hex[:12]}"
            client = boto3.client(
                "s3",
                endpoint_url=server.endpoint,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                region_name="us-east-1",
            )
            client.create_bucket(Bucket=bucket)
            cache = [f'data.cache="s3://{bucket}/smoke.zarr"']

            # the cache, built once to S3, as `--set data.cache=s3://...` would
            for name in [k for k in os.environ if k.startswith("AWS_")]:
                monkeypatch.delenv(name)
            for name, value in DUMMY_AWS_ENV.items():
                monkeypatch.setenv(name, value)
            monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
            monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-build"))
            built = prepare_dataset(
                resolve_config(
                    preset="smoke", overrides=[*smoke_sets(smoke_data, tmp_path), *cache]
                ).data,
                progress=False,
            )
            assert built.cache.root == f"s3://{bucket}/smoke.zarr" and built.cache.complete
            before = manifest_cases(client, bucket)

            # two nodes (per-rank batch 2) and one process (batch 4, 8 held-out pairs)
            port = free_port()
            nodes: list[subprocess.Popen[str]] = []
            try:
                for node, proxy in enumerate((p0, p1)):
                    folder = tmp_path / f"node{node}"
                    folder.mkdir()
                    sets = [*smoke_sets(smoke_data, folder / "runs"), *cache, *COMMON]
                    cmd = [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--nnodes=2",
                        "--nproc-per-node=1",
                        "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=127.0.0.1:{port}",
                        "--rdzv-id=smoke-two-nodes",
                        "--local-addr=127.0.0.1",  # both nodes are this host: no name lookup
                        "-m",
                        "training.run",
                        "--preset",
                        "smoke",
                        *set_args(sets),
                    ]
                    nodes.append(
                        subprocess.Popen(
                            cmd,
                            cwd=folder,
                            env=aws_env(proxy.endpoint, folder / "xdg"),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            text=True,
                            start_new_session=True,  # torchrun and its worker: one group
                        )
                    )
                single_sets = [
                    *smoke_sets(smoke_data, tmp_path / "single"),
                    *cache,
                    *COMMON,
                    "data.batch_size=4",
                    "stage2.heldout_pairs=8",
                ]
                single = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "training.run",
                        "--preset",
                        "smoke",
                        *set_args(single_sets),
                    ],
                    cwd=tmp_path,
                    env=aws_env(server.endpoint, tmp_path / "xdg-single"),
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                outs = [proc.communicate(timeout=600)[0] for proc in nodes]
            finally:
                for proc in nodes:  # whatever is left of a failed run
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
            for proc, out in zip(nodes, outs, strict=True):
                assert proc.returncode == 0, out[-4000:]
            assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-4000:]
            requests = [list(p.records) for p in (p0, p1)]
            after = manifest_cases(client, bucket)

    # both nodes read the cache over S3; nothing was uploaded again (rank 0's build step
    # found every case there: it rewrites the manifest, with the same case folders)
    assert after == before and len(before) == 4
    for records in requests:
        assert any(r.method == "GET" and r.range for r in records), "a node read no chunk"
        writes = [r for r in records if r.method in ("PUT", "POST", "DELETE")]
        assert all(r.path == f"/{bucket}/smoke.zarr/zarr.json" for r in writes), writes

    # only global rank 0 wrote a run folder, on its node
    run_dirs = [tmp_path / f"node{n}" / "runs" / "smoke" for n in (0, 1)]
    written = [d for d in run_dirs if d.exists()]
    assert len(written) == 1, [sorted(p.name for p in d.rglob("*")) for d in written]
    ddp_run, one_run = written[0], tmp_path / "single" / "smoke"
    ddp_summary = json.loads((ddp_run / "summary.json").read_text())
    one_summary = json.loads((one_run / "summary.json").read_text())
    assert ddp_summary["device"].endswith("2 ranks") and "ranks" not in one_summary["device"]

    # the same gates: outcome and epochs equal, values within the tolerance
    assert len(ddp_summary["stages"]) == len(one_summary["stages"]) == 3
    for got, want in zip(ddp_summary["stages"], one_summary["stages"], strict=True):
        assert {k: got[k] for k in ("name", "gate", "reached", "epochs")} == {
            k: want[k] for k in ("name", "gate", "reached", "epochs")
        }
        assert abs(got["value"] - want["value"]) < GATE_TOL, (got, want)
    ddp_val, one_val = ddp_summary["val"]["classes"], one_summary["val"]["classes"]
    assert abs(ddp_val["liver"]["voe"] - one_val["liver"]["voe"]) < GATE_TOL

    # the same checkpoints: names, positions, and networks within the tolerance
    ddp_ckpts, one_ckpts = checkpoints(ddp_run), checkpoints(one_run)
    assert list(ddp_ckpts) == list(one_ckpts) and len(one_ckpts) >= 4
    for name, want in one_ckpts.items():
        got = ddp_ckpts[name]
        assert (got["stage"], got["epoch"], got["step"]) == (
            want["stage"],
            want["epoch"],
            want["step"],
        )
        assert len(got["extra"]["rank_rng"]) == 2 and len(want["extra"]["rank_rng"]) == 1
        for net in ("segnet", "adversary"):
            error = relative_l2(got["models"][net], want["models"][net])
            assert error < WEIGHT_TOL, (name, net, error)
