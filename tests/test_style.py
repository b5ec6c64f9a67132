"""The repository keeps its own lint and format rules (pyproject.toml [tool.ruff]) and its layering."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff(command):
    if not Path(RUFF).exists():
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    result = subprocess.run([RUFF, *command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_long_functions_or_modules():
    for path in sorted((ROOT / "calibfuse").rglob("*.py")):
        lines = path.read_text().splitlines()
        assert len(lines) <= 330, f"{path.relative_to(ROOT)} has {len(lines)} lines"
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 70, f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {length} lines"
