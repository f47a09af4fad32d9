"""SIGTERM under load and a constant-load soak, both against a real `cotap serve` (bench/reliability.py).

Drain: every request the server logged was answered to its client with that status (200 with the
right features, or 503 before work began), requests it never logged got no answer, the drain ends
idle (not by timeout) and the process exits 0 within `drain_timeout_s`.
Soak (slow): resident memory grows < 5 % after warm-up, no file-descriptor or thread growth.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest


def test_sigterm_under_load_drains_and_exits_0(bench: ModuleType, tiny_bundle: Path, tmp_path: Path) -> None:
    report = bench.run_drain(
        tiny_bundle,
        tmp_path,
        clients=6,
        load_seconds_before=2.0,
        max_seconds_after=20.0,
        n_images=6,
        image_size=(48, 64),
        drain_timeout_s=10,
        max_queue_delay_ms=100,  # batches wait to fill: work is queued when SIGTERM comes
    )
    print(f"\ndrain: {report}")
    assert not report.problems(), report.problems()
    assert report.outcomes.get("200", 0) > 0 and report.logged > 0
    assert report.in_flight_at_sigterm > 0  # SIGTERM came with requests on their way
    assert report.drain_seconds < 10


@pytest.mark.slow
def test_soak_45s_no_growth(bench: ModuleType, tiny_bundle: Path, tmp_path: Path) -> None:
    report = bench.run_soak(
        tiny_bundle, tmp_path, seconds=45.0, warmup_seconds=15.0, rate=20.0, image_size=(48, 64)
    )
    print(f"\nsoak: { {k: v for k, v in vars(report).items() if k != 'samples'} }")
    assert not report.problems(), report.problems()
