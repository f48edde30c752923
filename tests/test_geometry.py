"""The plan (spacing in mm and windows): resampling rules, aspect kept, carried by checkpoints, cross-spacing
agreement of predictions in world space, and the errors for bad geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_from_to, resample_to_output

from delinea.datamodules import DatasetError, FolderDataModule
from delinea.geometry import (
    Axes,
    Plan,
    PlanRequest,
    Region,
    SlidingLayout,
    crop_window,
    from_lattice,
    lattice_padding,
    mask_to_lattice,
    offset_range,
    resolve_plan,
    tile_offsets,
    to_lattice,
    window_offsets,
)
from delinea.labels import ORGAN_IDS
from delinea.main import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "delinea" / "sample"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def finer_and_wider(
    image: nib.Nifti1Image, spacing: float, pad_mm: tuple[float, float], fill: float
) -> nib.Nifti1Image:
    """``image`` resampled in-plane to ``spacing`` mm with nibabel (linear), then padded with ``fill`` by
    ``pad_mm`` (before, after) on both in-plane axes: another scanner's grid and field of view of one subject."""
    fine = resample_to_output(image, voxel_sizes=(spacing, spacing, image.header.get_zooms()[2]), order=3, cval=fill)
    before, after = (round(mm / spacing) for mm in pad_mm)
    array = np.pad(
        np.asarray(fine.dataobj, dtype=np.float32), ((before, after), (before, after), (0, 0)), constant_values=fill
    )
    affine = fine.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([before, before, 0])
    return nib.Nifti1Image(np.round(array).astype(np.int16), affine)


# -- resampling and windows ------------------------------------------------------------------------------


def test_regions_keep_the_aspect_ratio_and_sit_on_a_lattice_fixed_in_space() -> None:
    axes = Axes((0.0, 0.0), (3.0, 3.0), (122, 101))  # voxel j centred at 3 j mm
    assert axes.region((0, 122, 0, 101), 1.5) == Region(-1, 243, -1, 201, 1.5)  # 366 x 303 mm at 1.5 mm
    assert Axes((0.0, 0.0), (0.7, 0.8), (512, 512)).region((0, 512, 0, 512), 1.4).size == (257, 294)
    # another scan of the same extent at 0.8 mm, shifted by a fraction of a voxel: the same lattice pixels
    fine = Axes((-1.1, -1.1), (0.8, 0.8), (458, 380))
    assert fine.region((0, 458, 0, 380), 3.0) == axes.region((0, 122, 0, 101), 3.0)
    assert Axes.of(np.diag([0.8, 0.9, 3.0, 1.0]) + np.eye(4) * 0, (10, 10)).spacing == (0.8, 0.9)


def test_mask_resampling_is_exact_for_integer_factors_and_keeps_thin_structures() -> None:
    mask = torch.zeros(40, 40, dtype=torch.long)
    mask[10:30, 12:20] = ORGAN_IDS["liver"]
    mask[5:35, 30] = ORGAN_IDS["aorta"]  # one pixel wide
    axes = Axes((0.5, 0.5), (1.0, 1.0), (40, 40))  # voxel j covers [j, j + 1) mm: on the lattice
    up = mask_to_lattice(mask, axes, axes.region((0, 40, 0, 40), 0.5), 9)
    assert up.shape == (80, 80) and torch.equal(up[::2, ::2], mask) and torch.equal(up[1::2, 1::2], mask)
    down = mask_to_lattice(mask, axes, axes.region((0, 40, 0, 40), 2.0), 9)  # the 1-pixel line must survive 2x
    assert down.shape == (20, 20) and (down == ORGAN_IDS["aorta"]).sum() >= 10
    image = torch.linspace(-1, 1, 40)[None, :].expand(40, 40)[None]
    fine = axes.region((0, 40, 0, 40), 0.5)
    back = from_lattice(to_lattice(image, axes, fine), fine, axes, (0, 40, 0, 40))  # a ramp survives up and down
    # (the outermost pixels see the background outside the scan)
    assert torch.allclose(back[..., 1:-1, 1:-1], image[..., 1:-1, 1:-1], atol=1e-3)


def test_round_trip_of_the_sample_labels_through_the_plan() -> None:
    """native 3 mm -> plan -> native, per organ: at least 0.99 Dice at 1.5 mm, 0.8 at 4.5 mm."""
    dm = FolderDataModule(root=str(SAMPLE), split="all")
    case = dm.load_case("ct")
    axes = Axes.of(case.geometry.canonical_affine, case.geometry.canonical_shape)
    zs = range(80, 100)
    box = (0, axes.shape[0], 0, axes.shape[1])
    for target, least in ((1.5, 0.99), (4.5, 0.8)):
        region = axes.region(box, target)
        back = np.zeros((*axes.shape, len(zs)), np.uint8)
        for i, k in enumerate(zs):
            onehot = torch.nn.functional.one_hot(mask_to_lattice(case.label[:, :, k], axes, region, 9), 9)
            back[:, :, i] = from_lattice(onehot.permute(2, 0, 1).float(), region, axes, box).argmax(0).numpy()
        truth = case.label[:, :, zs.start : zs.stop]
        for organ in range(1, 9):
            dice = 2 * ((back == organ) & (truth == organ)).sum() / ((back == organ).sum() + (truth == organ).sum())
            assert dice >= least, (target, organ, dice)


def test_windows_cover_and_pad() -> None:
    # training: a long slice is cut with the window centred anywhere on it, a short one lies inside the window
    assert offset_range(300, 256) == (-128, 171) and offset_range(100, 256) == (-156, 0)
    # centre_short: a short slice lies where inference's single window puts it; a long one is still cut anywhere
    assert offset_range(100, 256, centre_short=True) == (-78, -78) == (tile_offsets(100, 256)[0],) * 2
    assert offset_range(300, 256, centre_short=True) == (-128, 171)
    rng = np.random.default_rng(0)
    starts = {window_offsets((100, 300), 256, rng, centre_short=True) for _ in range(50)}
    assert {top for top, _ in starts} == {-78} and len({left for _, left in starts}) > 10
    # inference windows (256, stride 128) on the lattice: a region from pixel 200 of 300 pixels becomes 72 + 300 + 12
    assert lattice_padding(200, 300, 256, 128) == (72, 12)
    assert lattice_padding(-63, 125, 128, 64) == (1, 2)  # a region shorter than a window is centred in it
    assert tile_offsets(300, 256) == [-106, 150] and tile_offsets(100, 256) == [-78]
    image = torch.arange(12.0).reshape(1, 3, 4)
    patch = crop_window(image, -1, 2, 4, -1.0)
    assert patch.shape == (1, 4, 4) and patch[0, 0].tolist() == [-1.0] * 4
    assert patch[0, 1].tolist() == [2.0, 3.0, -1.0, -1.0]


def test_the_plan_is_resolved_in_one_pure_function(tmp_path: Path) -> None:
    """Fitting: explicit > the model's (parent, resumed) > the file beside the split > the cases' median (to be
    written there); evaluating: the model's, with explicit windows, and a spacing that disagrees is refused."""
    model = Plan({"ct": 3.0}, (64,), "parent")
    spacings = {"ct": [0.8, 0.8, 1.0, 1.0, 1.6, 1.6]}
    beside = tmp_path / "split.plan.json"
    request = PlanRequest("d", default_plan_file=beside, case_spacings=lambda: spacings)
    assert resolve_plan(None, "fit", request) == (Plan({"ct": 1.0}, (256,)), beside)  # the median, to be written
    assert not beside.exists()  # the function decides; the caller writes
    Plan({"ct": 2.0}, (32,)).save(beside)
    assert resolve_plan(None, "fit", request).plan == Plan({"ct": 2.0}, (32,))  # the file beside the split
    assert resolve_plan(model, "fit", request).plan == model  # a parent's geometry is kept when fine-tuning
    explicit = PlanRequest("d", spacing=1.5, resolutions=(128,), case_spacings=lambda: spacings)
    assert resolve_plan(model, "fit", explicit).plan == Plan.uniform(1.5, 128)  # explicit options win when fitting
    windows = PlanRequest("d", resolutions=(32, 64))
    assert resolve_plan(model, "test", windows).plan == Plan({"ct": 3.0}, (32, 64))  # the model's, other windows
    with pytest.raises(DatasetError, match=r"d: spacing=1\.5 .* disagrees with the model's plan \(ct 3 mm"):
        resolve_plan(model, "test", explicit)
    with pytest.raises(DatasetError, match="d: no model plan and no training cases to plan a spacing from"):
        resolve_plan(None, "predict", PlanRequest("d"))
    with pytest.warns(UserWarning, match="d: the model carries no plan; evaluating at ct 1 mm"):
        resolve_plan(None, "test", PlanRequest("d", case_spacings=lambda: spacings))


def test_sliding_windows_sit_on_the_lattice() -> None:
    # a 70-pixel axis from lattice pixel 37 with 32-pixel windows, stride 16: padded to start at 32 (a multiple of
    # the stride) and to hold 32 + 16 k pixels; a 20-pixel axis is centred in one window
    layout = SlidingLayout.of(37, 5, 70, 20, 32, 16)
    assert layout.start == (32, 5 - 6) and layout.pad == (6, 6, 5, 5)
    assert (layout.pad[2] + 70 + layout.pad[3] - 32) % 16 == 0
    assert layout.seed(16, 0) == SlidingLayout.of(53, 5, 54, 20, 32, 16).seed(0, 0)  # same place, same noise
    assert SlidingLayout.of(None, None, 70, 20, 32, 16) == SlidingLayout((0, 0), (0, 0, 0, 0))


def test_non_square_fields_of_view_are_not_stretched(tmp_path: Path) -> None:
    """A 2:1 field of view (80 x 40 mm at 1 mm) holding a disk of 12 mm radius: at a 2 mm plan the whole slice is
    served 41 x 21 (the lattice pixels it touches; 23 x 23 cut to the disk's box + 10 mm), and the disk stays a
    disk in the served slice and in training windows."""
    xx, yy = np.meshgrid(np.arange(80) + 0.5, np.arange(40) + 0.5, indexing="ij")
    disk = (xx - 50) ** 2 + (yy - 20) ** 2 <= 12**2
    image = np.where(disk, 60, -1000).astype(np.int16)[:, :, None].repeat(3, 2)
    label = (disk * ORGAN_IDS["liver"]).astype(np.uint8)[:, :, None].repeat(3, 2)
    for kind, array in (("images", image), ("labels", label)):
        (tmp_path / kind).mkdir()
        nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / kind / "wide.nii.gz")
    for margin, size in ((None, (41, 21)), (10.0, (23, 23))):
        dm = FolderDataModule(
            root=str(tmp_path),
            modality="ct",
            split="all",
            resolution=32,
            spacing=2.0,
            foreground_share=1.0,
            body_margin=margin,
            split_file=str(tmp_path / "split.json"),
        )
        whole = dm.dataset("val")[1]
        assert whole["image"].shape == (1, *size)
        assert whole["box"].tolist() == ([0, 80, 0, 40] if margin is None else [26, 72, 0, 40])
        rows, cols = torch.nonzero(whole["mask"] == ORGAN_IDS["liver"], as_tuple=True)
        assert rows.max() - rows.min() == cols.max() - cols.min() == 11  # 24 mm across both ways: 12 pixels
        window = dm.dataset("train")[(1, 32, 7)]["mask"]
        rows, cols = torch.nonzero(window == ORGAN_IDS["liver"], as_tuple=True)
        assert rows.max() - rows.min() == cols.max() - cols.min() == 11
    # centre_short: the 23 x 23 slice sits in every 32-pixel training window as the inference window holds it
    dm = FolderDataModule(
        root=str(tmp_path), modality="ct", split="all", resolution=32, spacing=2.0, centre_short=True,
        split_file=str(tmp_path / "split.json"),
    )  # fmt: skip
    windows = [dm.dataset("train")[(1, 32, seed)] for seed in range(6)]
    assert len({w["cache_key"] for w in windows}) == 1
    expected = crop_window(dm.dataset("val")[1]["mask"], -4, -4, 32, 0)  # lattice_padding(0, 23, 32, 32) = (4, 5)
    assert all(torch.equal(w["mask"], expected) for w in windows)


# -- the plan through the CLI, in checkpoints, and across scanners ---------------------------------------


@pytest.fixture(scope="module")
def ct_slab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twenty slices of the bundled CT (3 mm, 122 x 101) with its labels, as a folder dataset."""
    root = tmp_path_factory.mktemp("ct_slab")
    for kind in ("images", "labels"):
        (root / kind).mkdir()
        nib.save(nib.load(SAMPLE / kind / "ct.nii.gz").slicer[:, :, 80:100], root / kind / "ct.nii.gz")
    return root


def _fit_unet(root: Path, run: Path, extra: list[str] = ()) -> Path:
    main(
        [
            "fit",
            "--model",
            "UNetTask",
            "--model.channels",
            "[16, 32, 64, 128]",
            "--model.num_res_units",
            "1",
            "--model.lr",
            "1e-2",
            "--data",
            "folder",
            "--data.root",
            str(root),
            "--data.modality",
            "ct",
            "--data.split",
            "all",
            "--data.split_file",
            str(run / "split.json"),
            "--data.resolution",
            "128",
            "--data.batch_size",
            "8",
            "--trainer.max_steps",
            "400",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.default_root_dir",
            str(run),
            "--trainer.logger",
            "false",
            *extra,
            *QUIET,
        ]
    )
    return next(run.rglob("*.ckpt"))


def _predict(checkpoint: Path, scan: Path, out: Path, extra: list[str] = ()) -> nib.Nifti1Image:
    main(
        [
            "predict",
            "--ckpt",
            str(checkpoint),
            "--data",
            "scan",
            "--data.path",
            str(scan),
            "--data.modality",
            "ct",
            "--output",
            str(out),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(out.parent / f"run_{out.name}"),
            *extra,
            *QUIET,
        ]
    )
    return nib.load(out / (scan.name.removesuffix(".nii.gz") + "_seg.nii.gz"))


def test_a_scan_at_another_spacing_segments_like_the_original(ct_slab: Path, tmp_path: Path) -> None:
    """The plan is computed and written at fit, carried by the checkpoint, and used by ``predict --ckpt`` on the
    same CT resampled to 0.8 mm (cubic, nibabel) and padded with air to a wider field of view: in world space the
    two label maps agree, Dice >= 0.9 for every organ the model finds in the original (1000 voxels or more; a
    model trained for 40 s here misses some small ones, and what it barely finds flips with any change)."""
    checkpoint = _fit_unet(ct_slab, tmp_path / "run")
    plan = Plan({"ct": 3.0}, (128,))
    assert Plan.load(tmp_path / "run" / "split.plan.json") == plan  # the median of the training case, 3 mm
    assert Plan.from_dict(torch.load(checkpoint, weights_only=True)["delinea_plan"]) == plan
    original = ct_slab / "images" / "ct.nii.gz"
    wider = tmp_path / "wider.nii.gz"
    nib.save(finer_and_wider(nib.load(original), 0.8, (40.0, 64.0), -1024.0), wider)
    assert nib.load(wider).shape[:2] == (585, 506)  # 0.8 mm over 468 x 405 mm instead of 3 mm over 366 x 303
    first = _predict(checkpoint, original, tmp_path / "a")
    second = _predict(checkpoint, wider, tmp_path / "b")
    assert second.shape == nib.load(wider).shape and np.allclose(second.affine, nib.load(wider).affine)
    sidecar = json.loads((tmp_path / "b" / "wider_seg.json").read_text())
    assert Plan.from_dict(sidecar["plan"]) == plan  # the checkpoint's spacing, not the scan's 0.8 mm
    on_first_grid = np.asarray(resample_from_to(second, first, order=0).dataobj)
    labels = np.asarray(first.dataobj)
    present = [o for o in range(1, 9) if (labels == o).sum() >= 1000]
    assert len(present) >= 4
    for organ in present:
        a, b = labels == organ, on_first_grid == organ
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.9, organ


def test_a_later_stage_reads_the_plan_file_and_explicit_spacing_wins(ct_slab: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    Plan({"ct": 6.0}, (32,), "edited by hand").save(run / "split.plan.json")  # a plan file beside the split
    checkpoint = _fit_unet(ct_slab, run, ["--trainer.max_steps", "1"])
    assert Plan.from_dict(torch.load(checkpoint, weights_only=True)["delinea_plan"]) == Plan({"ct": 6.0}, (128,))
    explicit = _fit_unet(ct_slab, tmp_path / "explicit", ["--trainer.max_steps", "1", "--data.spacing", "4.5"])
    assert torch.load(explicit, weights_only=True)["delinea_plan"]["spacing_mm"] == {"ct": 4.5, "mr": 4.5}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data.spacing", "0"], "spacing 0.0 must be a positive number of mm per pixel"),
        (["--data.spacing", "-1.5"], "spacing -1.5 must be a positive number of mm per pixel"),
        (["--data.spacing", "25"], "spacing 25.0 mm per pixel is absurd for a scan (expected at most 20 mm)"),
        (
            ["--data.resolution", "8", "--model.channels", "[4, 8, 16, 32, 64]"],
            "plan window 8 px is not a multiple of 16, the smallest size step UNetTask can take",
        ),
    ],
)
def test_bad_geometry_is_one_line(
    argv: list[str], message: str, ct_slab: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _fit_unet(ct_slab, tmp_path / "run", ["--trainer.max_steps", "1", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any("Traceback" in line for line in err)


def test_a_plan_that_disagrees_with_the_checkpoint_is_refused(
    ct_slab: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _fit_unet(ct_slab, tmp_path / "run", ["--trainer.max_steps", "1"])
    Plan({"ct": 1.0}, (128,)).save(tmp_path / "other.plan.json")
    scan = ct_slab / "images" / "ct.nii.gz"
    for i, (extra, named) in enumerate(
        (
            (["--data.plan_file", str(tmp_path / "other.plan.json")], "other.plan.json"),
            (["--data.spacing", "1.0"], "spacing=1.0"),
        )
    ):
        with pytest.raises(SystemExit) as exit_info:
            _predict(checkpoint, scan, tmp_path / f"out{i}", extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert named in err and "disagrees with the model's plan (ct 3 mm" in err
        assert not list((tmp_path / f"out{i}").glob("*.nii.gz"))  # refused before any prediction
    with pytest.raises(DatasetError, match="not a delinea plan"):
        (tmp_path / "bad.plan.json").write_text('{"spacing": 1}')
        Plan.load(tmp_path / "bad.plan.json")
