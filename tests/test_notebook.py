"""The quickstart notebook, executed top to bottom in a kernel running this interpreter.

The fast test runs it on a checkpoint shaped like the real demo's (frozen backbones loaded from folders given
by absolute path, ``init_from`` pointing at a checkpoint that no longer exists); the slow one on the checkpoint
``python -m delinea.demo --smoke`` writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import nbformat
import nibabel as nib
import numpy as np
import pytest
import torch
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from torch.utils.data import DataLoader

from delinea.demo.run import main as demo
from delinea.geometry import Plan
from delinea.labels import FOREGROUND
from delinea.models import build_dit, build_vae, save_dit, save_vae
from delinea.tasks import MedDelineaTask
from delinea.testing.slices import SyntheticSlices

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
MR = ROOT / "delinea" / "sample" / "images" / "mr.nii.gz"


def execute(tmp_path: Path, checkpoint: Path | str, output: Path) -> nbformat.NotebookNode:
    """Run the notebook from its own folder (as Jupyter does) in a kernel on ``sys.executable``."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    # A private kernelspec: a "python3" installed for the user elsewhere could run another interpreter.
    spec = tmp_path / "kernels" / "delinea-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "delinea test",
                "language": "python",
                "env": {"DELINEA_CHECKPOINT": str(checkpoint), "DELINEA_QUICKSTART_OUTPUT": str(output)},
            }
        )
    )
    km = KernelManager(
        kernel_name="delinea-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)])
    )
    NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


def check_outputs(nb: nbformat.NotebookNode, output: Path) -> None:
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert Path(nb.cells[-1].outputs[0]["text"].strip()) == Path(sys.executable)
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline figure"

    mr = nib.load(MR)
    for name, dtype in (("mr_seg", np.uint8), ("mr_uncertainty", np.float32)):
        written = nib.load(output / f"{name}.nii.gz")
        assert written.shape == mr.shape
        assert np.allclose(written.affine, mr.affine, atol=1e-4)
        assert written.get_data_dtype() == dtype
    labels = np.asarray(nib.load(output / "mr_seg.nii.gz").dataobj)
    assert 0 <= labels.min() and labels.max() <= len(FOREGROUND)
    uncertainty = nib.load(output / "mr_uncertainty.nii.gz").get_fdata()
    assert 0 <= uncertainty.min() and uncertainty.max() <= 1 + 1e-3

    metrics = json.loads((output / "mr_metrics.json").read_text())
    assert set(metrics) == {"all slices", "held-out slices 0-9"}
    whole = metrics["all slices"]
    assert list(whole) == list(FOREGROUND)  # every organ is in the sample MR: all evaluated
    assert all(0 <= m["dice"] <= 1 and m["status"] in ("ok", "pred_empty") for m in whole.values())
    assert (output / "mr_overlays.png").stat().st_size > 0


def test_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "code" and 'CHECKPOINT = os.environ.get("DELINEA_CHECKPOINT"' in first.source
    assert "demo/meddelinea_mr_fewshot.ckpt" in first.source
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")


def test_notebook_runs_on_a_checkpoint_with_backbone_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_dit(build_dit("DiT-tiny/2", sample_size=16), tmp_path / "dit")
    save_vae(build_vae("tiny"), tmp_path / "vae")
    config = {
        "dit": str(tmp_path / "dit"),
        "vae": str(tmp_path / "vae"),
        "image_size": 32,
        "control_blocks": 2,
        "sampling_steps": 2,
    }

    def fit(task: MedDelineaTask, path: Path) -> Path:
        run = pl.Trainer(
            max_steps=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        run.fit(task, DataLoader(SyntheticSlices(4, 32, 0), batch_size=4))
        task.set_plan(Plan({"ct": 12.0}, (32,)))  # what a datamodule would have set: 12 mm windows of 32 px
        run.save_checkpoint(path)
        return path

    # Like the demo's few-shot checkpoint: fine-tuned from another one, with a latent cache (both gone now).
    pretrained = fit(MedDelineaTask(**config), tmp_path / "pretrained.ckpt")
    checkpoint = fit(
        MedDelineaTask(**config, init_from=str(pretrained), latent_cache=str(tmp_path / "cache")),
        tmp_path / "fewshot.ckpt",
    )
    pretrained.unlink()

    nb = execute(tmp_path, checkpoint, tmp_path / "out")
    check_outputs(nb, tmp_path / "out")


def test_notebook_says_how_to_get_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CellExecutionError, match="run `make demo` first"):
        execute(tmp_path, "demo/no_such.ckpt", tmp_path / "out")


@pytest.mark.slow
def test_notebook_runs_on_the_smoke_demo_checkpoint(tmp_path: Path) -> None:
    demo(["--smoke", "--out", str(tmp_path / "demo")])
    nb = execute(tmp_path, tmp_path / "demo" / "meddelinea_mr_fewshot.ckpt", tmp_path / "out")
    check_outputs(nb, tmp_path / "out")
