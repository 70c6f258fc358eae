"""The SO_REUSEPORT group: one free port for every member, and whether the kernel migrates queued connections."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cmpnas.serving import reuseport


def test_a_group_shares_one_port_and_refuses_a_port_in_use() -> None:
    group = reuseport.bind_group("127.0.0.1", 0, 3, 16)
    try:
        ports = {s.getsockname()[1] for s in group}
        assert len(ports) == 1 and all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for s in group)
        with pytest.raises(OSError):
            reuseport.bind_group("127.0.0.1", ports.pop(), 1, 16)
    finally:
        for s in group:
            s.close()


@pytest.mark.parametrize(("text", "expected"), [("0\n", False), ("1\n", True), (None, None)])
def test_the_migration_setting_is_read_from_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, expected: bool | None
) -> None:
    sysctl = tmp_path / "tcp_migrate_req"
    if text is not None:
        sysctl.write_text(text)
    monkeypatch.setattr(reuseport, "MIGRATE_SYSCTL", sysctl)
    assert reuseport.queued_connections_migrate() is expected
