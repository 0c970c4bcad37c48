"""The package's layers (pyproject's import-linter contracts) hold, cover every module, and catch a breach."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contracts() -> list[dict]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["tool"]["importlinter"]["contracts"]


def top_level_modules() -> set[str]:
    """Every `vrft.<name>` there is: subpackages and top-level modules (the config link excluded)."""
    package = ROOT / "vrft"
    names = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    return {f"vrft.{name}" for name in names}


def lint(cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the tree in `cwd` is the one analysed, not the installed package.
    env = {"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_contracts_are_kept():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("source", ["vrft.rewards", "vrft.precision", "vrft.kernels"])
def test_self_contained_layers_forbid_every_other_module(source):
    contract = next(c for c in contracts() if c.get("source_modules") == [source])
    # A module added later must be named too, or the "imports nothing of vrft" promise silently weakens.
    assert set(contract["forbidden_modules"]) == top_level_modules() - {source}


@pytest.mark.parametrize(
    "importer, line, contract",
    [
        ("rewards/format.py", "import vrft.modules.scoring", "rewards import nothing"),
        ("data/loading.py", "import vrft.rollout.batch", "data does not import"),
        ("rollout/batch.py", "import vrft.planner.report", "the planner is imported by"),
        ("models/frozen.py", "import vrft.rollout.decoder", "no import cycles"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, importer, line, contract):
    shutil.copytree(ROOT / "vrft", tmp_path / "vrft", ignore=shutil.ignore_patterns("__pycache__", "_conf"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "vrft" / importer
    target.write_text(target.read_text() + f"\n{line}  # deliberately forbidden\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout[-3000:]
