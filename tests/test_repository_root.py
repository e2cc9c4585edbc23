"""From the repository root, the kernels/ and evaluation/ folders shadow nothing and the documented commands run.

The root is on ``sys.path`` whenever Python runs from it (``python -m ...``, ``python -c``, pytest). Those folders
hold the ``kvpress_kernels`` and ``kvpress_evaluation`` packages and have no ``__init__.py`` themselves, so at most
they form an empty namespace package, which any installed distribution of the same name takes precedence over.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert done.returncode == 0, f"{args} failed from {ROOT}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.parametrize("folder", ["kernels", "evaluation"])
def test_top_level_folders_are_not_packages(folder):
    assert (ROOT / folder).is_dir() and not (ROOT / folder / "__init__.py").exists()
    assert not (ROOT / f"{folder}.py").exists()


def test_transformers_imports_from_the_root():
    # transformers imports the kernel-hub distribution `kernels` when it is installed (a dependency since 5.2x).
    _run("-c", "import transformers.activations, transformers.integrations.hub_kernels, kvpress, kvpress_kernels")


@pytest.mark.parametrize("name", ["kernels", "evaluation"])
def test_an_installed_distribution_wins_over_the_folder(tmp_path, name):
    """A regular package of the same name later on the path is the one imported, never the root folder."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("WHO = 'the installed distribution'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = _run("-c", f"import {name}; print({name}.WHO, {name}.__file__)", env=env)
    assert done.stdout.startswith("the installed distribution") and str(tmp_path) in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("-m", "kvpress", "--help"),
        ("-m", "kvpress_evaluation", "--list"),
        ("-m", "pytest", "--collect-only", "-q", "tests/presses/test_scorer_press.py"),
    ],
    ids=["main-job", "evaluation-cli", "pytest-collection"],
)
def test_documented_commands_run_from_the_root(args):
    _run(*args)
