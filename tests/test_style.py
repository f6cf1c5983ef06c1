"""The code base stays ruff-clean and ruff-formatted (rules and width in pyproject.toml)."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")


def test_ruff_check_is_clean():
    run = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_ruff_format_is_clean():
    run = subprocess.run(
        ["ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def _autograd_uses(tree: ast.AST) -> list[str]:
    """Code (not prose) that would bring in autograd: torch.autograd, torch.optim, backward()."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                if node.attr in ("autograd", "optim", "enable_grad"):
                    found.append(f"line {node.lineno}: torch.{node.attr}")
            if node.attr in ("backward", "requires_grad_"):
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg == "requires_grad":
            found.append(f"line {node.value.lineno}: requires_grad=")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            ("torch.autograd", "torch.optim")
        ):
            found.append(f"line {node.lineno}: from {node.module} import")
    return found


def test_no_autograd_in_the_package():
    """ffkern's gradients are closed form: no autograd or torch.optim in ffkern/ or kernels/."""
    offenders = []
    for folder in ("ffkern", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            offenders += [f"{path.relative_to(ROOT)} {use}" for use in _autograd_uses(tree)]
    assert not offenders, offenders


def test_the_autograd_detector_detects():
    """Guard for the test above: each forbidden form is found."""
    code = "import torch\nx.backward()\ntorch.optim.SGD\ntorch.zeros(1, requires_grad=True)\n"
    assert len(_autograd_uses(ast.parse(code))) == 3
