"""SIGTERM during training: finish the step, checkpoint, stop (exit code 143), so a rerun resumes exactly.

Schedulers (Slurm, Kubernetes, systemd) send SIGTERM before killing a job. Dying at once would lose up to
a minute of training since the last checkpoint; the handler only raises a flag that the loop reads at its
next step boundary. Outside a training loop SIGTERM keeps its default action (the process ends at once,
which the atomic writes make as safe as a kill).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from cmpnas.distributed import DistInfo


class SigtermFlag:
    """Context manager: while active, SIGTERM sets :attr:`requested` instead of ending the process."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> SigtermFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def agreed(self, info: DistInfo, device: torch.device) -> bool:
        """Whether any rank was asked to stop: under torchrun every rank must stop at the same step."""
        if not (info.enabled and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
