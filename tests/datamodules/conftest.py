"""Synthetic datasets in each on-disk layout, written once per session (tests that damage files copy them)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from delinea.testing import phantoms
from delinea.testing.phantoms import Phantom

Layout = tuple[Path, dict[str, Phantom]]


def _make(factory: pytest.TempPathFactory, name: str, write: Callable[[Path], dict[str, Phantom]]) -> Layout:
    root = factory.mktemp(name)
    return root, write(root)


@pytest.fixture(scope="session")
def btcv(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return _make(tmp_path_factory, "btcv", lambda r: phantoms.write_btcv(r, n=5))


@pytest.fixture(scope="session")
def amos(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return _make(tmp_path_factory, "amos", lambda r: phantoms.write_amos(r, n_ct=7, n_mr=3))


@pytest.fixture(scope="session")
def atlas8k(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return _make(tmp_path_factory, "atlas8k", lambda r: phantoms.write_atlas8k(r, n=10))


@pytest.fixture(scope="session")
def cirrmri600(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return _make(tmp_path_factory, "cirrmri600", lambda r: phantoms.write_cirrmri600(r, n_t1=5, n_t2=5))


@pytest.fixture(scope="session")
def panseg(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return _make(tmp_path_factory, "panseg", lambda r: phantoms.write_panseg(r, n_t1=5, n_t2=5))


@pytest.fixture(scope="session")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    cases = {f"case{i:02d}": ("ct" if i % 2 else "mr") for i in range(20)}
    return _make(tmp_path_factory, "folder", lambda r: phantoms.write_folder(r, cases))


@pytest.fixture
def btcv_copy(btcv: Layout, tmp_path: Path) -> Layout:
    """A private copy of the BTCV layout that a test may damage."""
    root = tmp_path / "btcv"
    shutil.copytree(btcv[0], root)
    return root, btcv[1]
