"""Crash safety: a run killed with SIGKILL resumes exactly where it stopped, ``--ckpt_path last`` finds its
checkpoint or stops, and checkpoint writes are atomic."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from delinea.callbacks import AtomicCheckpointIO
from delinea.main import main
from delinea.testing.backbones import write_backbones
from delinea.testing.phantoms import write_btcv

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"


@pytest.fixture(scope="module")
def btcv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("btcv")
    write_btcv(root, n=4)
    return root


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Pretrained-like backbone folders: with DiT's zero-initialised gates the control branch would get no
    gradient, and its bit-identity would prove nothing."""
    folders = write_backbones(tmp_path_factory.mktemp("backbones"))
    return ["--model.dit", folders["dit"], "--model.vae", folders["vae"]]


def fit(btcv: Path, run: Path, steps: int, *extra: str, accumulate: int = 1) -> subprocess.CompletedProcess:
    """``delinea fit`` of the tiny MedDelinea in a fresh process, a checkpoint after every optimiser step."""
    argv = [
        sys.executable, "-m", "delinea", "fit", "--config", str(CONF / "meddelinea_btcv.yaml"),
        "--data.root", str(btcv), "--data.split_file", str(run.parent / "split.json"),
        "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps),
        "--trainer.accumulate_grad_batches", str(accumulate), "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_last", "true",
        "--trainer.callbacks.save_top_k", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=run.parent, timeout=600)


def final_state(run: Path) -> dict[str, torch.Tensor]:
    """Trained weights and optimiser moments of the newest last.ckpt under ``run``."""
    path = max(run.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(("model.control.", "model.vae.head."))}
    moments = checkpoint["optimizer_states"][0]["state"]
    state |= {f"adam.{i}.{k}": v for i, s in moments.items() for k, v in s.items() if torch.is_tensor(v)}
    state["global_step"] = torch.tensor(checkpoint["global_step"])
    return state


KILL = "--trainer.callbacks+=delinea.testing.faults.KillAtBatch"


@pytest.mark.parametrize(
    "accumulate, steps, kills",
    [(1, 6, ((3, 3), (4, 4))), pytest.param(2, 4, ((4, 2),), marks=pytest.mark.slow)],  # slow: suite < 10 min
    ids=["at-an-epoch-end-then-mid-epoch", "mid-accumulation"],
)
def test_killed_run_resumes_bit_identical(
    btcv: Path, backbones: list[str], tmp_path: Path, accumulate: int, steps: int, kills: tuple[tuple[int, int], ...]
) -> None:
    """SIGKILL at each micro-batch of ``kills`` in turn (with the optimiser steps done by then), resuming with
    ``--ckpt_path last`` after each: the final weights and optimiser state equal an uninterrupted run's bit for bit
    (the loader's position and the noise and timesteps are restored). An epoch here is 3 micro-batches: the first
    kill of the first case comes right after the checkpoint of an epoch's last batch, the second mid-epoch; with
    accumulation 2 (an epoch: steps of 2 and 1 micro-batches) the kill comes after the first micro-batch of the
    second epoch's first step, which the resumed run redoes."""
    whole = fit(btcv, tmp_path / "whole", steps, *backbones, accumulate=accumulate)
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = final_state(tmp_path / "whole")
    run = tmp_path / "killed"
    resume: tuple[str, ...] = ()
    for kill_at, steps_done in kills:
        killed = fit(btcv, run, steps, *backbones, *resume, KILL, f"--trainer.callbacks.batch={kill_at}",
                     accumulate=accumulate)  # fmt: skip
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        stopped = final_state(run)
        assert int(stopped["global_step"]) == steps_done < steps
        resume = ("--ckpt_path", "last")
    resumed = fit(btcv, run, steps, *backbones, *resume, accumulate=accumulate)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr
    result = final_state(run)
    assert int(result["global_step"]) == steps
    assert reference.keys() == result.keys()
    different = [k for k in reference if not torch.equal(reference[k], result[k])]
    assert not different, different[:5]
    # and the resumed part did train: the weights moved after the last kill
    key = "model.control.zero_linears.0.weight"
    assert not torch.equal(stopped[key], result[key])


@pytest.mark.parametrize(
    "checkpointing",
    [["--trainer.callbacks.every_n_train_steps", "5", "--trainer.callbacks.save_top_k", "-1"],
     ["--trainer.callbacks.monitor", "step", "--trainer.callbacks.mode", "min",  # best: the first validation
      "--trainer.callbacks.save_top_k", "1", "--trainer.limit_train_batches", "2"]],
    ids=["every-5-steps", "monitored"],
)  # fmt: skip
def test_last_checkpoint_is_the_final_state(btcv: Path, tmp_path: Path, checkpointing: list[str]) -> None:
    """Lightning alone would leave last.ckpt at step 5, or at the best validation: a resume or a finished run's
    model would silently lose the steps after it."""
    main(["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", str(btcv), "--data.split_file",
          str(tmp_path / "split.json"), "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps",
          "7", "--trainer.logger", "false", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
          "--trainer.callbacks.save_last", "true", *checkpointing])  # fmt: skip
    (last,) = (tmp_path / "run").rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 7
    saved = {torch.load(p, map_location="cpu", weights_only=True)["global_step"] for p in last.parent.glob("*.ckpt")}
    assert len(saved) > 1  # the other checkpoints were written earlier: the test tells the two behaviours apart


def test_ckpt_path_last_without_a_checkpoint_stops(btcv: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONF / "meddelinea_btcv.yaml"), "--data.root", str(btcv),
              "--data.split_file", str(tmp_path / "split.json"), "--trainer.default_root_dir", str(tmp_path / "run"),
              "--ckpt_path", "last"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("delinea: error: --ckpt_path last: no last.ckpt under") and str(tmp_path / "run") in err
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def _write_in_child(code: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A process saving 200 MB checkpoints in a loop is killed mid-write: last.ckpt is a whole checkpoint (the old
    one or a new one), with $TMPDIR on another filesystem where one exists (Lightning's writer truncates there)."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.arange(10.0)}, target)
    code = (
        "import torch, sys\nfrom delinea.callbacks import AtomicCheckpointIO\n"
        f"big = {{'step': 2, 'w': torch.ones(50_000_000)}}\n"
        f"while True: AtomicCheckpointIO().save_checkpoint(big, {str(target)!r})\n"
    )
    env = {"TMPDIR": "/dev/shm"} if Path("/dev/shm").is_dir() else {}
    child = _write_in_child(code, env)

    def temporary() -> Path | None:  # .last.ckpt.tmp-<host>-<pid>
        return next(tmp_path.glob(f".last.ckpt.tmp-*-{child.pid}"), None)

    deadline = time.monotonic() + 120
    while not ((found := temporary()) and found.stat().st_size > 10_000_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert temporary() is not None, "the child never got to write (see its stderr)" + child.stderr.read()[-500:]
    kept = torch.load(target, weights_only=True)
    assert kept["step"] in (1, 2) and kept["w"].numel() in (10, 50_000_000)


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A file-size limit (what a full disk looks like to the writer) stops a save: the error reaches the caller,
    the previous checkpoint is intact and no partial file is left."""
    target = tmp_path / "last.ckpt"
    code = (
        "import resource, signal, torch\nfrom delinea.callbacks import AtomicCheckpointIO\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"AtomicCheckpointIO().save_checkpoint({{'step': 1, 'w': torch.arange(10.0)}}, {str(target)!r})\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, {resource.RLIM_INFINITY}))\n"
        f"AtomicCheckpointIO().save_checkpoint({{'step': 2, 'w': torch.ones(1_000_000)}}, {str(target)!r})\n"
    )
    child = _write_in_child(code)
    _, err = child.communicate(timeout=120)
    assert child.returncode != 0 and ("File too large" in err or "failed writing" in err), err[-1000:]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(10.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
