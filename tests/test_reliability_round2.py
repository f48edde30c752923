"""Reliability, second round: every file delinea writes is whole or absent after a kill or a full disk; predict never
replaces its inputs nor reads its own outputs as scans; split files, model folders and ``--ckpt_path last`` refuse
what is ambiguous; runs started together get their own folders; the plan's spacing and windows and the samplers'
step counts are bounded; a guessed DiT head count is warned about; and the remaining tracebacks are one line naming
the file or option."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import test_reliability
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from test_models import _original_state_dict
from test_reliability import CONF, QUIET, one_line_error

import delinea.callbacks
import delinea.outputs
from delinea.callbacks import AtomicCheckpointIO
from delinea.datamodules import BTCVDataModule, FolderDataModule
from delinea.datamodules.splits import load_or_create_split
from delinea.errors import CheckpointError, DatasetError, OptionError, UserError
from delinea.evaluation import save_overlays, write_reports
from delinea.geometry import MAX_SLICE_PIXELS, Axes, Plan, check_spacing
from delinea.io import save_nifti
from delinea.main import main
from delinea.models import build_dit, save_dit
from delinea.models.diffusion import check_sampling_steps, make_sampler, sample_latents
from delinea.models.dit import load_dit
from delinea.runs import claim_version
from delinea.segmenter import Segmenter
from delinea.tasks import MedDelineaTask, UNetTask, load_task
from delinea.tasks.export import read_model_folder, save_model_folder
from delinea.testing.faults import full_disk, open_on_full_disk
from delinea.testing.phantoms import make_phantom, write_case

SLOW = pytest.mark.slow
btcv = test_reliability.btcv  # the tiny BTCV fixture, shared


@pytest.fixture(scope="module")
def unet(btcv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step UNet checkpoint on the tiny BTCV."""
    run = tmp_path_factory.mktemp("unet")
    main(["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", str(btcv), "--data.split_file",
          str(run / "split.json"), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.default_root_dir", str(run), *QUIET])  # fmt: skip
    return next(run.rglob("*.ckpt"))


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    for i in range(2):
        write_case(make_phantom(i, "ct"), folder / f"s{i}.nii.gz", None, None)
    return folder


def predict_argv(checkpoint: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["predict", "--ckpt", str(checkpoint), "--data", "scan", "--data.path", str(data), "--output", str(output),
            "--trainer.default_root_dir", str(output.parent / "run"), *QUIET, *extra]  # fmt: skip


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hidden(folder: Path) -> list[str]:
    """Temporary files (``.<name>.tmp-...``) left in a folder."""
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name)


# -- data loss: predictions written whole or not at all ----------------------------------------------------------


def test_a_full_disk_while_predict_rewrites_keeps_the_earlier_result(
    unet: Path, scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ``--overwrite true`` on a full disk truncated the earlier ``s0_seg.nii.gz`` to a few KB, then a
    traceback. Now: one line naming the file and the full disk; the earlier file is byte for byte intact, nothing
    temporary is left, and the case's old sidecar (which the new result would contradict) is gone."""
    out = tmp_path / "out"
    main(predict_argv(unet, scans, out))
    before = {p.name: digest(p) for p in out.iterdir()}
    monkeypatch.setattr(gzip.GzipFile, "write", full_disk(gzip.GzipFile.write, room=100))
    line = one_line_error(predict_argv(unet, scans, out, "--overwrite", "true"), capsys)
    assert f"{out / 's0_seg.nii.gz'}: not written, the disk is full (No space left on device [ENOSPC])" in line
    assert "the earlier file there is intact" in line
    assert {p.name: digest(p) for p in out.iterdir()} == {k: v for k, v in before.items() if k != "s0_seg.json"}
    assert hidden(out) == []


def _kill_predict(argv: list[str], fault: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"import sys\nfrom delinea.testing import faults\nfaults.{fault}\nfrom delinea.main import main\n"
    code += "main(sys.argv[1:])"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)  # fmt: skip


@SLOW
def test_predict_killed_at_any_moment_leaves_whole_files_or_none(unet: Path, scans: Path, tmp_path: Path) -> None:
    """SIGKILL during a label map's compression, during an uncertainty map's, and just before each of the six
    renames of a two-case run with uncertainty (between every pair of files). Before: a killed ``--overwrite`` left
    the earlier result at 0 bytes, a killed first run an unreadable ``s0_seg.nii.gz`` that the next run refused as
    existing. Now: every label and uncertainty map present reads whole (the earlier result or the new, equal one),
    every sidecar parses, and the next run finishes and removes the killed runs' temporary files."""
    out = tmp_path / "out"
    argv = predict_argv(unet, scans, out, "--save_uncertainty", "true")
    main(argv)
    expected = {p.name: np.asarray(nib.load(p).dataobj) for p in out.glob("[!.]*.nii.gz")}
    faults = ["kill_at_write('_seg', 2)", "kill_at_write('_uncertainty', 2)", *(f"kill_at_replace({n})" for n in
              range(1, 7))]  # fmt: skip
    for fault in faults:
        killed = _kill_predict([*argv, "--overwrite", "true"], fault, tmp_path)
        assert killed.returncode == -9, (fault, killed.stderr[-1500:])
        assert {p.name for p in out.glob("[!.]*.nii.gz")} == set(expected), fault  # none lost
        for path in out.glob("[!.]*.nii.gz"):  # whole: it reads, and holds the result (float maps up to threads)
            values = np.asarray(nib.load(path).dataobj)
            assert np.allclose(values, expected[path.name], rtol=0, atol=1e-3), (fault, path.name)
        for path in out.glob("[!.]*.json"):
            assert json.loads(path.read_text())["files"]["labels"].endswith(path.stem + ".nii.gz"), fault
    assert hidden(out)  # the kills left temporary files...
    main([*argv, "--overwrite", "true"])
    assert hidden(out) == []  # ...which the next run removed
    fresh = tmp_path / "fresh"
    killed = _kill_predict(predict_argv(unet, scans, fresh), "kill_at_write('_seg', 2)", tmp_path)
    assert killed.returncode == -9
    assert not (fresh / "s0_seg.nii.gz").exists()  # absent, not partial
    main(predict_argv(unet, scans, fresh))  # so the next run is not refused
    assert sorted(p.name for p in fresh.iterdir()) == ["s0_seg.json", "s0_seg.nii.gz", "s1_seg.json", "s1_seg.nii.gz"]


def test_predict_never_replaces_an_input_and_skips_its_own_outputs(
    unet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: with ``x.nii.gz`` and the scan ``x_seg.nii.gz`` in the folder predicted into itself with
    ``--overwrite``, the scan was replaced by x's segmentation, and the next run segmented that label map as a scan.
    Now the output that would replace an input is refused before any work; and the segmentations delinea wrote
    (marked in their header) are skipped with a warning when they sit among the scans, refused when named alone."""
    mix = tmp_path / "mix"
    write_case(make_phantom(0, "ct"), mix / "x.nii.gz", None, None)
    shutil.copy(mix / "x.nii.gz", mix / "x_seg.nii.gz")
    before = {p.name: digest(p) for p in mix.iterdir()}
    line = one_line_error(predict_argv(unet, mix, mix, "--overwrite", "true"), capsys)
    assert f"x_seg.nii.gz would replace the input scan {mix / 'x_seg.nii.gz'} (case 'x_seg')" in line
    assert {p.name: digest(p) for p in mix.iterdir()} == before
    (mix / "x_seg.nii.gz").unlink()
    main(predict_argv(unet, mix, mix))
    with pytest.warns(UserWarning, match=r"skipped 1 segmentation\(s\) that delinea predict wrote \(x_seg.nii.gz\)"):
        main(predict_argv(unet, mix, mix, "--overwrite", "true"))
    assert sorted(p.name for p in mix.iterdir() if not p.name.startswith(".")) == [
        "x.nii.gz", "x_seg.json", "x_seg.nii.gz"]  # fmt: skip
    line = one_line_error(predict_argv(unet, mix / "x_seg.nii.gz", tmp_path / "o"), capsys)
    assert "x_seg.nii.gz: a segmentation that delinea predict wrote, not a scan" in line


def test_temporaries_of_killed_processes_are_removed_and_no_others(tmp_path: Path) -> None:
    """Before: each killed checkpoint save left a ``.last.ckpt.tmp-<pid>`` for good. Now the first write of a later
    process into the folder removes the temporary files of dead processes of this machine (today's and the older
    name), and leaves a live process's and another machine's alone."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now free
    dead, host = child.pid, delinea.outputs._host()
    names = {
        f".last.ckpt.tmp-{host}-{dead}": False, f".last.ckpt.tmp-{dead}": False,
        f".x_seg.nii.gz.tmp-{host}-{dead}.nii.gz": False, f".epoch=0-step=1.ckpt.tmp-{host}-{os.getpid()}": True,
        f".last.ckpt.tmp-othermachine-{dead}": True, ".notes.tmp": True,
    }  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / f".dit.tmp-{host}-{dead}").mkdir()  # a model folder's staging folder
    (tmp_path / f".dit.tmp-{host}-{dead}" / "config.json").write_text("{}")
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3.0)}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.ckpt", *(n for n, kept in names.items() if kept)]
    )
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["w"], torch.arange(3.0))


def _writers(tmp_path: Path) -> dict[str, tuple[Path, Callable[[], object]]]:
    """Each file writer of the library: (its target, a call that rewrites it)."""
    rows = [{"case": "a", "organ": "liver", "status": "ok", "dice": 0.5, "hd95": 1.0, "assd": 0.5}]
    image = np.zeros((8, 8, 3), np.float32)
    task = UNetTask(channels=[4, 8, 16], num_res_units=1)
    return {
        "nifti": (tmp_path / "x.nii.gz", lambda: save_nifti(image, np.eye(4), tmp_path / "x.nii.gz", overwrite=True)),
        "csv report": (tmp_path / "metrics_per_case.csv", lambda: write_reports(rows, tmp_path, overwrite=True)),
        "json report": (tmp_path / "metrics_summary.json", lambda: write_reports(rows, tmp_path, overwrite=True)),
        "overlay png": (tmp_path / "o.png", lambda: save_overlays(image, None, image.astype(int), tmp_path / "o",
                                                                 overwrite=True)),
        "plan": (tmp_path / "plan.json", lambda: Plan.uniform(1.5, 32).save(tmp_path / "plan.json")),
        "checkpoint": (tmp_path / "last.ckpt", lambda: AtomicCheckpointIO().save_checkpoint({"w": 1}, tmp_path
                                                                                             / "last.ckpt")),
        "model folder": (tmp_path / "m" / "model.safetensors", lambda: save_model_folder(task, tmp_path / "m",
                                                                                         overwrite=True)),
        "split": (tmp_path / "split.json", lambda: load_or_create_split(tmp_path / "split.json", ["a", "b"],
                                                                        (0.5, 0.5, 0.0), 0)),
        "dit folder": (tmp_path / "dit" / "diffusion_pytorch_model.safetensors",
                       lambda: save_dit(build_dit("DiT-tiny/2", sample_size=8), tmp_path / "dit")),
    }  # fmt: skip


@pytest.mark.parametrize("writer", ["nifti", "csv report", "json report", "overlay png", "plan", "checkpoint",
                                    "model folder", "split", "dit folder"])  # fmt: skip
def test_every_writer_keeps_the_earlier_file_when_the_disk_is_full(
    writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file the library writes goes through one atomic writer: when flushing the new file fails as on a full
    disk (ENOSPC), the writer names the file in one line, the earlier file is byte for byte intact (a split file,
    written only when none exists, stays absent) and no temporary file is left. A writer that bypassed it would
    succeed here."""
    target, write = _writers(tmp_path)[writer]
    if writer != "split":
        write()
    before = digest(target) if target.exists() else None

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(delinea.outputs, "_fsync", full)
    with pytest.raises(UserError, match=r"not written, the disk is full \(No space left on device \[ENOSPC\]\)"):
        write()
    assert (digest(target) if target.exists() else None) == before
    assert hidden(tmp_path) == []


# -- silent wrong --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [(lambda s: s["train"].append(s["train"][0]), "is listed twice in train"),
     (lambda s: s["test"].append(s["train"][0]), "is listed in test and train")],
    ids=["twice", "two-subsets"],
)  # fmt: skip
def test_a_split_listing_a_case_twice_or_in_two_subsets_is_refused(
    change: Callable[[dict], None], message: str, btcv: Path, tmp_path: Path
) -> None:
    """Before: the case trained twice, or the test scored a training case. Now: one line naming the file, the case
    and the subsets."""
    split_file = tmp_path / "split.json"
    split = BTCVDataModule(root=str(btcv), split_file=str(split_file)).split
    change(split)
    split_file.write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=rf"{split_file}: case '{split['train'][0]}' {message}"):
        _ = BTCVDataModule(root=str(btcv), split_file=str(split_file)).split


def _damage(folder: Path, how: str) -> None:
    shards = sorted(folder.glob("model-*.safetensors"))
    if how == "stale-single-file":  # an earlier save's weights, all zero, beside the shards
        state = read_model_folder(folder)["state_dict"]
        from safetensors.torch import save_file

        save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(folder / "model.safetensors"))
    elif how == "missing-shard":
        shards[-1].unlink()
    elif how == "shard-not-indexed":
        shutil.copy(shards[0], folder / f"model-00009-of-0000{len(shards)}.safetensors")
    elif how == "index-disagrees":
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        key = next(iter(index["weight_map"]))
        index["weight_map"][key] = shards[-1].name
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "shards-without-index":
        (folder / "model.safetensors.index.json").unlink()


@pytest.mark.parametrize(
    ("how", "message"),
    [("stale-single-file", "model.safetensors beside the shards model.safetensors.index.json names"),
     ("missing-shard", r"shard\(s\) \['model-0000(\d)-of-0000\1.safetensors'\] named by model.safetensors.index.json "
                       "are missing"),
     ("shard-not-indexed", "model-00009-of-"), ("index-disagrees", "index and shards disagree"),
     ("shards-without-index", "without their index model.safetensors.index.json")],
)  # fmt: skip
def test_a_model_folder_whose_index_and_files_disagree_is_refused(
    how: str, message: str, unet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a stale ``model.safetensors`` beside the shards supplied every weight (all-background predictions,
    exit 0), a missing shard ended in "Missing key(s) in state_dict". Now: one line naming the folder."""
    folder = save_model_folder(load_task(unet), tmp_path / "model", max_shard_mb=0.01)
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    _damage(folder, how)
    with pytest.raises(CheckpointError, match=rf"^{folder}: .*{message}"):
        read_model_folder(folder)
    if how in ("stale-single-file", "missing-shard"):
        write_case(make_phantom(0, "ct"), tmp_path / "scan.nii.gz", None, None)
        line = one_line_error(predict_argv(folder, tmp_path / "scan.nii.gz", tmp_path / "out"), capsys)
        assert str(folder) in line
        assert not (tmp_path / "out").exists()


def test_a_diffusers_folder_with_a_stale_file_beside_its_shards_is_refused(tmp_path: Path) -> None:
    """The same rule for a DiT (or VAE) folder: ``diffusion_pytorch_model.safetensors`` beside the shards."""
    save_dit(build_dit("DiT-tiny/2", sample_size=8), tmp_path / "dit", max_shard_size="200KB")
    shards = sorted((tmp_path / "dit").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 2
    shutil.copy(shards[0], tmp_path / "dit" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"dit: diffusion_pytorch_model.safetensors beside the shards"):
        load_dit(tmp_path / "dit")


def test_ckpt_path_last_resumes_the_run_these_options_describe(
    btcv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run A (1 step) then run B (other lr, 3 steps) in one folder. Before: ``--ckpt_path last`` with A's options
    resumed B's newer state. Now it resumes A (the resumed run reaches step 2, where B's state would stop at 3), and
    options no run was saved with are refused in one line naming the option that differs."""
    root = tmp_path / "root"
    fit = ["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", str(btcv), "--data.split_file",
           str(tmp_path / "split.json"), "--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "0",
           "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last", "true", *QUIET]  # fmt: skip
    main([*fit, "--trainer.max_steps", "1"])
    main([*fit, "--trainer.max_steps", "3", "--model.lr", "0.05"])
    main([*fit, "--trainer.max_steps", "2", "--ckpt_path", "last"])
    resumed = root / "lightning_logs" / "version_2" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, map_location="cpu", weights_only=True)["global_step"] == 2
    line = one_line_error([*fit, "--trainer.max_steps", "4", "--ckpt_path", "last", "--model.lr", "0.02"], capsys)
    assert "--ckpt_path last: no run under" in line and "differs in model.init_args.lr=0.02 (run: " in line


def test_runs_started_together_take_their_own_version_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: two fits started at once both listed the folder, both took ``version_0`` and mixed their
    checkpoints. Now each claims its version with ``mkdir``, which only one can win: two loggers that both see
    ``version_0`` free (the race, held open here) end in ``version_0`` and ``version_1``."""
    monkeypatch.setattr(TensorBoardLogger, "_get_next_version", lambda self: 0)
    loggers = [TensorBoardLogger(str(tmp_path)) for _ in range(2)]
    for logger in loggers:
        claim_version(logger)
    assert [logger.version for logger in loggers] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_a_second_fit_into_a_running_fits_checkpoint_folder_is_refused(
    btcv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a logger two runs share ``<root>/checkpoints``: while one runs (its lock held here), a second is
    refused in one line before its first step."""
    import fcntl

    folder = tmp_path / "root" / "checkpoints"
    folder.mkdir(parents=True)
    with open(folder / ".delinea-fit.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        line = one_line_error(["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", str(btcv),
                               "--data.split_file", str(tmp_path / "split.json"), "--trainer.logger", "false",
                               "--trainer.default_root_dir", str(tmp_path / "root"), *QUIET], capsys)  # fmt: skip
    assert f"checkpoint folder {folder} is in use by another running fit (pid 1 on elsewhere)" in line
    assert sorted(p.name for p in folder.iterdir()) == [".delinea-fit.lock"]


def test_the_plan_bounds_its_spacing_slices_and_windows(capsys: pytest.CaptureFixture[str], btcv: Path) -> None:
    """Before: ``--data.spacing 0.01`` was accepted and a 2-step fit took 186 s instead of 13 s. Now a spacing finer
    than 0.1 mm, a slice of more than 4096 pixels a side and more than 4096 windows a slice are refused with the
    reason."""
    line = one_line_error(["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", str(btcv),
                           "--data.spacing", "0.01"], capsys)  # fmt: skip
    assert "spacing 0.01 mm per pixel is finer than any CT or MRI slice (expected at least 0.1 mm" in line
    assert check_spacing(0.1) == 0.1
    axes = Axes.of(np.diag([0.8, 0.8, 3.0, 1.0]), (600, 600))  # a 48 cm field of view
    assert axes.region((0, 600, 0, 600), 0.2).size == (2400, 2400)
    with pytest.raises(OptionError, match=rf"480 x 480 mm slice to 4800 x 4800 pixels, more than {MAX_SLICE_PIXELS}"):
        axes.region((0, 600, 0, 600), 0.1)
    task = UNetTask(channels=[4, 8, 16], num_res_units=1)
    task.set_plan(Plan.uniform(1.0, 8))  # windows of 8 px at a stride of 4
    with pytest.raises(OptionError, match=r"a 300 x 300 px slice takes 5476 windows of 8 px \(more than 4096\)"):
        Segmenter(task).segment_slices(torch.zeros(1, 1, 300, 300))
    with pytest.raises(OptionError, match=r"a 600 x 600 px slice takes 5625 windows of 8 px"):  # validation's tiles
        task.tile({"image": torch.zeros(1, 1, 600, 600), "mask": torch.zeros(1, 600, 600, dtype=torch.long)})


@pytest.mark.parametrize(("sampler", "steps", "most"), [("dpmsolver++", 1000, 999), ("unipc", 1000, 999),
                                                         ("ddim", 1001, 1000)])  # fmt: skip
def test_sampler_step_counts_diffusers_cannot_take_are_refused(sampler: str, steps: int, most: int) -> None:
    """Before: ``dpmsolver++`` and ``unipc`` at 1000 steps returned NaN probabilities without a word: diffusers
    repeats a timestep (shown here on its own scheduler). Now the count is refused, naming the most it takes, which
    samples finite latents."""
    if sampler != "ddim":
        diffusers_sampler = make_sampler(sampler)
        diffusers_sampler.set_timesteps(steps)
        assert len(set(diffusers_sampler.timesteps.tolist())) < steps  # the repeated timestep behind the NaN
    with pytest.raises(OptionError, match=rf"sampling_steps {steps} is more than .*: choose at most {most}$"):
        check_sampling_steps(sampler, steps)
    with pytest.raises(OptionError, match=rf"sampling_steps {steps} is more than"):  # --model.sampling_steps too
        MedDelineaTask(dit="DiT-tiny/2", vae="tiny", image_size=32, control_blocks=1, sampler=sampler,
                       sampling_steps=steps)  # fmt: skip
    latents = sample_latents(lambda z, t: torch.zeros_like(z), (1, 4, 2, 2), sampler, most, torch.Generator())
    assert torch.isfinite(latents).all()


def test_a_guessed_dit_head_count_is_warned_about(tmp_path: Path) -> None:
    """Before: a DiT ``.pt`` shaped like a preset loaded with the preset's heads, silently (off by 0.25 when trained
    with others). Now the guess is warned about, naming ``--model.dit_num_heads``; a given count or a ``train.py``
    checkpoint's ``args.model`` is no guess."""
    torch.save(_original_state_dict(depth=4, dim=64, patch=2, grid=4), tmp_path / "tiny.pt")  # DiT-tiny's shape
    with pytest.warns(UserWarning, match=r"tiny.pt: the head count .* assuming 4, that of the DiT-tiny preset"):
        assert load_dit(tmp_path / "tiny.pt").config.num_attention_heads == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert load_dit(tmp_path / "tiny.pt", num_heads=8).config.num_attention_heads == 8


# -- tracebacks and unclear messages -------------------------------------------------------------------------------


def _rgb(source: Path, target: Path) -> None:
    image = nib.load(source)
    values = np.clip(np.asarray(image.dataobj), 0, 255).astype(np.uint8)
    rgb = np.zeros(values.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = values
    nib.save(nib.Nifti1Image(rgb, image.affine), target)


def test_rgb_nifti_is_refused_naming_the_file(
    unet: Path, btcv: Path, scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a numpy error naming no file, as a scan to predict or a training image. Now one line naming it."""
    _rgb(scans / "s0.nii.gz", tmp_path / "rgb.nii.gz")
    line = one_line_error(predict_argv(unet, tmp_path / "rgb.nii.gz", tmp_path / "out"), capsys)
    assert f"{tmp_path / 'rgb.nii.gz'}: holds colour (RGB) voxels of type" in line and "one grey value" in line
    root = tmp_path / "btcv"
    shutil.copytree(btcv, root)
    dm = BTCVDataModule(root=str(root), split_file=str(tmp_path / "split.json"), resolution=32)
    image = dm.files[dm.split["train"][0]].image
    _rgb(image, image)
    with pytest.raises(DatasetError, match=rf"{image}: holds colour \(RGB\) voxels"):
        dm.setup("fit")


def test_a_hyperparameter_holding_a_class_path_is_refused_naming_the_file(
    unet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: refused by jsonargparse with a 20-line usage dump naming neither folder nor file. Now one line naming
    the folder's config.json and the hyperparameter; nothing was built."""
    folder = save_model_folder(load_task(unet), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["hyper_parameters"]["channels"] = {"class_path": "torch.nn.Identity", "init_args": {}}
    (folder / "config.json").write_text(json.dumps(config))
    write_case(make_phantom(0, "ct"), tmp_path / "scan.nii.gz", None, None)
    line = one_line_error(predict_argv(folder, tmp_path / "scan.nii.gz", tmp_path / "out"), capsys)
    assert f"{folder / 'config.json'}: hyperparameter 'channels' holds a class path" in line


def test_trainer_and_model_options_are_named(btcv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``--trainer.max_steps -5`` ended in Lightning's MisconfigurationException traceback and
    ``--model.image_size 30`` in "sample_size 15 is not divisible by the patch size 2". Now both are one line
    naming the option and value."""
    data = ["--data.root", str(btcv), "--data.split_file", str(tmp_path / "split.json"), "--trainer.default_root_dir",
            str(tmp_path / "run")]  # fmt: skip
    line = one_line_error(["fit", "--config", str(CONF / "unet_btcv.yaml"), *data, "--trainer.max_steps", "-5"], capsys)
    assert "--trainer: `max_steps` must be a non-negative integer or -1 (infinite steps). You passed in -5." in line
    line = one_line_error(["fit", "--config", str(CONF / "meddelinea_btcv.yaml"), *data, "--model.image_size", "30"],
                          capsys)  # fmt: skip
    assert "image_size 30 must be a positive multiple of 4 (the VAE's downsampling 2 x the patch size of DiT-tiny/2)" \
        in line  # fmt: skip


def test_an_unusable_split_dir_is_one_line(
    btcv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ``DELINEA_SPLIT_DIR`` pointing at a file gave "[Errno 17] File exists", on a read-only filesystem a
    traceback. Now one line naming the split file and the variable. (Tests run as root here, so the read-only
    filesystem is simulated by the error it raises.)"""
    fit = ["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", str(btcv), "--trainer.default_root_dir",
           str(tmp_path / "run")]  # fmt: skip
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("DELINEA_SPLIT_DIR", str(tmp_path / "a_file"))
    line = one_line_error(fit, capsys)
    assert f"split file {tmp_path / 'a_file'}/btcv-" in line and f"({tmp_path / 'a_file'} is a file, not a folder)" \
        in line and f"set DELINEA_SPLIT_DIR (now {tmp_path / 'a_file'}) to a writable folder" in line  # fmt: skip
    read_only = tmp_path / "read_only"
    monkeypatch.setenv("DELINEA_SPLIT_DIR", str(read_only))
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    line = one_line_error(fit, capsys)
    assert f"split file {read_only}/btcv-" in line and "(Read-only file system [EROFS])" in line


def test_invalid_yaml_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "<unicode string>, line 2" under a usage dump. Now one line naming the file, line and column."""
    (tmp_path / "bad.yaml").write_text("model:\n  class_path: x\n bad: [\n")
    for argv in (["--config", str(tmp_path / "bad.yaml")], [f"--config={tmp_path / 'bad.yaml'}"],
                 ["--config", str(CONF / "unet_btcv.yaml"), "--trainer", str(tmp_path / "bad.yaml")]):  # fmt: skip
        line = one_line_error(["fit", *argv], capsys)
        assert f"{tmp_path / 'bad.yaml'}: invalid YAML at line 3, column 2" in line
    line = one_line_error(["fit", "--config", str(tmp_path / "none.yaml")], capsys)
    assert f"--config {tmp_path / 'none.yaml'}: no such file" in line


def test_a_folder_named_like_a_nifti_file_is_named(
    unet: Path, scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "no readable DICOM image files". Now one line saying that the path is a folder named like a NIfTI
    file: in a folder dataset, among scans, and given as the scan."""
    root = tmp_path / "folder"
    for case in "abc":
        phantom = make_phantom(ord(case), "ct")
        write_case(phantom, root / "images" / f"{case}.nii.gz", root / "labels" / f"{case}.nii.gz", None, binary=True)
    (root / "images" / "b.nii.gz").unlink()
    (root / "images" / "b.nii.gz").mkdir()
    with pytest.raises(DatasetError, match=rf"{root / 'images' / 'b.nii.gz'}: a folder named like a NIfTI file"):
        _ = FolderDataModule(root=str(root), split_file=str(tmp_path / "split.json")).files
    (scans / "b.nii.gz").mkdir()
    for path in (scans, scans / "b.nii.gz"):
        line = one_line_error(predict_argv(unet, path, tmp_path / "out"), capsys)
        assert f"{scans / 'b.nii.gz'}: a folder named like a NIfTI file; expected a .nii or .nii.gz file" in line


def test_a_full_disk_during_a_checkpoint_save_is_one_line(
    btcv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: torch's "enforce fail ... unexpected pos" traceback. Now one line saying the disk is full and where;
    the checkpoints saved before stay loadable and no partial file is left."""
    full = open_on_full_disk(room=2000, after=2, name_part=".ckpt")  # the third checkpoint meets a full disk
    monkeypatch.setattr(delinea.callbacks, "open", full, raising=False)
    root = tmp_path / "run"
    line = one_line_error(["fit", "--config", str(CONF / "unet_btcv.yaml"), "--data.root", str(btcv),
                           "--data.split_file", str(tmp_path / "split.json"), "--trainer.logger", "false",
                           "--trainer.default_root_dir", str(root), "--trainer.max_steps", "5",
                           "--trainer.limit_val_batches", "0", "--trainer.callbacks+=ModelCheckpoint",
                           "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1",
                           *QUIET], capsys)  # fmt: skip
    third = root / "checkpoints" / "epoch=0-step=3.ckpt"
    assert line == (f"delinea: error: checkpoint {third}: not written, the disk is full (No space left on device "
                    "[ENOSPC]); nothing was left in its place; the checkpoints saved before it stay loadable: make "
                    "room, then resume from the newest (--ckpt_path)")  # fmt: skip
    saved = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert saved == [".delinea-fit.lock", "epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    assert torch.load(root / "checkpoints" / "epoch=0-step=2.ckpt", weights_only=True)["global_step"] == 2
