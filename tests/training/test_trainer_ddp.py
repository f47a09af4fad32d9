"""DDP on CPU: `torchrun --nproc_per_node 2` trains 5 steps with gloo; both replicas end equal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.training.test_trainer import TINY

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_torchrun_two_ranks_end_with_equal_weights(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(out),
        *TINY,
        "max_steps=5",
        "device=cpu",
        "plot=false",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert r0["backend"] == "gloo" and r0["world_size"] == 2
    assert (r0["reports"], r1["reports"]) == (True, False)
    # The ranks read disjoint shards of the data ...
    assert all(not set(a) & set(b) for a, b in zip(r0["batches"], r1["batches"], strict=True))
    # ... and end with identical weights (gradients all-reduced, prototypes broadcast after k-means).
    assert r0["prototypes_initialized"] and r1["prototypes_initialized"]
    assert r0["weights"].keys() == r1["weights"].keys()
    worst = max(
        float((r0["weights"][k].float() - r1["weights"][k].float()).abs().max()) for k in r0["weights"]
    )
    assert worst <= 1e-6, worst
    assert (out / "bundle" / "manifest.json").is_file() and (out / "checkpoints" / "last.pt").is_file()
