"""`pip install .` (a wheel, not editable) carries the configs: the commands run from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_trains_from_another_folder(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # No build isolation: the venv's setuptools builds it offline, in a second.
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        wheels,
        ROOT,
    ]
    subprocess.run([str(a) for a in build], check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("vrft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    yaml_in_conf = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {n.removeprefix("vrft/_conf/") for n in names if n.startswith("vrft/_conf/")} == yaml_in_conf
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel]
    subprocess.run([str(a) for a in install], check=True, timeout=300, capture_output=True)
    # PYTHONPATH puts the installed copy ahead of the checkout's editable install.
    env = dict(os.environ, PYTHONPATH=str(site))
    probe = [sys.executable, "-c", "import vrft.paths as p; print(p.config_dir())"]
    where = subprocess.run(probe, cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(site / "vrft" / "_conf")
    train = [
        sys.executable, "-m", "vrft.train", "trainer.max_steps=1", "warm_start=none",
        "algorithm.max_new_tokens=4", "algorithm.group_size=2", "algorithm.rollout_batch_size=1",
        "algorithm.prompts_per_step=1", "algorithm.update_micro_batch_size=2", "data.synthetic.num_train=4",
        "data.synthetic.num_test=2", "lora.r=2", "~callbacks.progress",
    ]  # fmt: skip
    result = subprocess.run(train, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run folder: {elsewhere / 'outputs'}" in result.stdout  # Hydra's run dir, under that folder
