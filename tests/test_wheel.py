"""A wheel built from the source tree carries everything the demo needs, and the demo runs from an installed copy
in another folder (no file is found through the working directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_wheel_runs_the_smoke_demo_from_elsewhere(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("delinea-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "delinea/demo/configs/meddelinea_fewshot.yaml",
        "delinea/demo/configs/unet_fewshot.yaml",
        "delinea/demo/weights/vae/config.json",
        "delinea/demo/weights/dit/config.json",
        "delinea/sample/images/ct.nii.gz",
        "delinea/sample/labels/mr.nii.gz",
    ):
        assert needed in names, needed
    installed = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(installed), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed), "DELINEA_SPLIT_DIR": str(tmp_path / "splits")}
    which = subprocess.run(
        [sys.executable, "-c", "import delinea; print(delinea.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert Path(which.stdout.strip()).is_relative_to(installed)  # the installed copy, not the source tree
    demo = subprocess.run(
        [sys.executable, "-m", "delinea.demo", "--smoke", "--out", str(elsewhere / "demo")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    summary = json.loads((elsewhere / "demo" / "summary.json").read_text())
    assert len(summary["tests"]) == 7
