"""One user-facing error type: the CLI prints its message (no traceback) and exits with code 2."""

from __future__ import annotations


class CmpnasError(Exception):
    """A problem the user can fix. The message names the problem *and* the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" Fix: {fix}" if fix else ""))


class Terminated(CmpnasError):
    """SIGTERM stopped the work cleanly (training: at a step boundary, after a checkpoint).

    Exit code 143 = 128 + SIGTERM, what a shell reports for a process that SIGTERM ended: schedulers
    (Slurm, Kubernetes) and scripts read it as "stopped on request", not as a user error (2).
    """

    exit_code = 143
