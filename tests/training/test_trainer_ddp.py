"""DDP on CPU: `torchrun --nproc_per_node 2` trains 6 steps with gloo; both replicas end equal, and
a run stopped at step 3 and resumed ends where the unbroken run did, on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.test_trainer import TINY

WORKER = Path(__file__).with_name("ddp_worker.py")
OVERRIDES = [*TINY, "max_steps=6", "checkpoint_every=3", "device=cpu", "plot=false"]


def torchrun(out: Path, *options: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(WORKER), str(out), *options, *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def ranks(out: Path, tag: str = "") -> list[dict[str, Any]]:
    return [torch.load(out / f"{tag}rank{r}.pt", weights_only=True) for r in (0, 1)]


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(out)
    return out


def test_torchrun_two_ranks_end_with_equal_weights(unbroken: Path) -> None:
    r0, r1 = ranks(unbroken)
    assert r0["backend"] == "gloo" and r0["world_size"] == 2
    assert (r0["reports"], r1["reports"]) == (True, False)
    # The ranks read disjoint shards of the data ...
    assert all(not set(a) & set(b) for a, b in zip(r0["batches"], r1["batches"], strict=True))
    # ... and end with identical weights (gradients all-reduced, prototypes broadcast after k-means).
    assert r0["prototypes_initialized"] and r1["prototypes_initialized"]
    assert worst(r0["weights"], r1["weights"]) <= 1e-6
    assert (unbroken / "bundle" / "manifest.json").is_file()
    assert (unbroken / "checkpoints" / "last.pt").is_file()


def test_torchrun_resume_restores_each_ranks_bank_and_queues(unbroken: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    torchrun(out, "--tag", "first", "--stop-at", "3")
    first = ranks(out, "first")
    assert [r["step"] for r in first] == [3, 3]
    # The ranks' memory banks and queues differ (each holds its own shard's features), so a
    # checkpoint that kept rank 0's alone would hand rank 1 the wrong ones on resume.
    assert not torch.equal(
        first[0]["method"]["patch_queue"]["rows"], first[1]["method"]["patch_queue"]["rows"]
    )
    torchrun(out, "--tag", "resumed", "--resume")
    resumed, full = ranks(out, "resumed"), ranks(unbroken)
    for rank, (a, b) in enumerate(zip(resumed, full, strict=True)):
        assert a["step"] == b["step"] == 6
        for part in ("bank", "patch_queue", "cls_queue"):
            for key, value in a["method"][part].items():
                if isinstance(value, torch.Tensor):
                    assert torch.allclose(value, b["method"][part][key], atol=1e-6), (rank, part, key)
        assert worst(a["weights"], b["weights"]) <= 1e-6, rank
