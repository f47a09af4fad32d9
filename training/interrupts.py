"""Ctrl+C during training: finish the step in progress, checkpoint it, then stop.

A KeyboardInterrupt raised in the middle of a step can leave the optimiser, the EMA teacher and the
queues out of step with each other, so nothing could be saved safely and up to `checkpoint_every`
steps were lost. Here the first SIGINT only sets a flag; the trainer looks at it between steps
(`agreed`, which under torchrun asks every rank, so that all stop after the same step), saves a
checkpoint and stops. A second SIGINT interrupts at once, as usual.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch

from cotap.training.distributed import all_reduce_max, is_distributed


class StepBoundaryInterrupt:
    """Context manager: within it, the first SIGINT is deferred to the next step boundary."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.requested = False  # a SIGINT arrived (on this rank)
        self.stopped = False  # the trainer stopped because of one (on every rank)
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl+C: do not wait for the step
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StepBoundaryInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def agreed(self) -> bool:
        """Whether to stop after this step: a SIGINT reached this rank, or any rank (torchrun)."""
        flag = self.requested
        if is_distributed():
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            flag = bool(all_reduce_max(t).item() > 0)
        self.stopped = self.stopped or flag
        return flag
