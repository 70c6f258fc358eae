"""One user-facing error type: the CLI prints its message (no traceback) and exits with code 2."""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines, tabs) as one space: library messages quoted in an
    error (a YAML parser dump, a torch state-dict diff) must not break the one-line contract."""
    return " ".join(str(text).split())


class CmpnasError(Exception):
    """A problem the user can fix. The message names the problem *and* the fix, on one line."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = one_line(problem)
        self.fix = one_line(fix) if fix else fix
        super().__init__(f"{self.problem}" + (f" Fix: {self.fix}" if self.fix else ""))


class Terminated(CmpnasError):
    """SIGTERM stopped the work cleanly (training: at a step boundary, after a checkpoint).

    Exit code 143 = 128 + SIGTERM, what a shell reports for a process that SIGTERM ended: schedulers
    (Slurm, Kubernetes) and scripts read it as "stopped on request", not as a user error (2).
    """

    exit_code = 143
