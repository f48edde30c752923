"""Shared test fixtures (kept generic: every test module may rely on them)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_split_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Datamodules write split files under $DELINEA_SPLIT_DIR: keep tests out of ~/.cache and of each other."""
    path = tmp_path_factory.mktemp("splits")
    monkeypatch.setenv("DELINEA_SPLIT_DIR", str(path))
    for name in ("ATLAS8K", "BTCV", "AMOS", "CIRRMRI600", "PANSEG", "FOLDER"):
        monkeypatch.delenv(f"DELINEA_{name}_ROOT", raising=False)
    monkeypatch.delenv("DELINEA_DATA", raising=False)
    return path
