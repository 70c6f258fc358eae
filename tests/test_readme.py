"""The README's Python API example runs as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    section = README.read_text().split("## Python API", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md[Python API]", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "paragon" in printed and "heterogeneous" in printed
    assert (tmp_path / "runs/api/eval/results.json").is_file()
    assert (tmp_path / "runs/api/query/model.safetensors").is_file()
