"""Each datamodule on synthetic data in its own layout: splits, label mapping, orientation, filters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from delinea.datamodules import (
    DATAMODULES,
    AMOSDataModule,
    Atlas8kDataModule,
    BTCVDataModule,
    CirrMRI600DataModule,
    FolderDataModule,
    LabelledDataModule,
    PanSegDataModule,
)
from delinea.datamodules.batches import EvalBatch, TrainBatch
from delinea.datamodules.splits import default_split_path
from delinea.geometry import Plan
from delinea.labels import ORGAN_IDS, ORGANS
from delinea.testing.phantoms import Phantom
from delinea.volumes import VolumeAssembler

Layout = tuple[Path, dict[str, Phantom]]

MULTI = [
    ("btcv", BTCVDataModule),
    ("amos", AMOSDataModule),
    ("atlas8k", Atlas8kDataModule),
    ("folder", FolderDataModule),
]
ALL = [*MULTI, ("cirrmri600", CirrMRI600DataModule), ("panseg", PanSegDataModule)]


def _dm(cls: type[LabelledDataModule], root: Path, **kwargs) -> LabelledDataModule:
    return cls(root=str(root), resolution=32, batch_size=4, **kwargs)


@pytest.mark.parametrize(("fixture", "cls", "sizes"), [
    ("btcv", BTCVDataModule, (3, 1, 1)),
    ("amos", AMOSDataModule, (8, 1, 1)),
    ("atlas8k", Atlas8kDataModule, (9, 1, 0)),  # pretraining 90:10, no test split
    ("cirrmri600", CirrMRI600DataModule, (8, 1, 1)),
    ("panseg", PanSegDataModule, (8, 1, 1)),
    ("folder", FolderDataModule, (16, 2, 2)),
])  # fmt: skip
def test_split_sizes_determinism_and_reuse(
    request: pytest.FixtureRequest, fixture: str, cls: type, sizes: tuple
) -> None:
    root, phantoms = request.getfixturevalue(fixture)
    dm = _dm(cls, root)
    split = dm.split
    assert tuple(len(split[s]) for s in ("train", "val", "test")) == sizes
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(phantoms)  # disjoint and complete
    assert dm.split_file == default_split_path(cls.name, root, 0) and dm.split_file.exists()
    assert _dm(cls, root).split == split  # same seed, same split
    other = _dm(cls, root, seed=1)
    assert other.split_file != dm.split_file and other.split["train"] != split["train"]
    # An existing file is read, not recomputed: edit it and a new datamodule follows the edit.
    data = json.loads(dm.split_file.read_text())
    data["val"], data["train"] = data["train"][:1], data["train"][1:] + data["val"]
    dm.split_file.write_text(json.dumps(data))
    assert _dm(cls, root).split["val"] == data["val"]


@pytest.mark.parametrize(("fixture", "cls"), ALL)
def test_labels_match_the_source_voxel_for_voxel(request: pytest.FixtureRequest, fixture: str, cls: type) -> None:
    root, phantoms = request.getfixturevalue(fixture)
    dm = _dm(cls, root)
    for case_id, phantom in list(phantoms.items())[:4]:
        case = dm.load_case(case_id)
        assert case.label is not None and case.label.dtype == np.uint8 and case.label.shape == (24, 20, 6)
        # Canonical unified label equals the phantom, whatever the stored orientation and source ids.
        np.testing.assert_array_equal(case.label, phantom.label)
        assert (
            np.bincount(case.label.ravel(), minlength=9).tolist()
            == np.bincount(phantom.label.ravel(), minlength=9).tolist()
        )
        assert case.image.dtype == np.float32 and case.image.min() >= -1 and case.image.max() <= 1
        assert case.spacing == pytest.approx((1.6, 1.4, 3.0))
        np.testing.assert_allclose(case.geometry.canonical_affine, phantom.affine, atol=1e-5)
        assert case.modality == phantom.modality


@pytest.mark.parametrize(("fixture", "cls"), MULTI)
def test_kidneys_by_position_including_lps_cases(request: pytest.FixtureRequest, fixture: str, cls: type) -> None:
    root, phantoms = request.getfixturevalue(fixture)
    dm = _dm(cls, root)
    orientations = set()
    for case_id, phantom in phantoms.items():
        case = dm.load_case(case_id)
        orientations.add(phantom.orientation)
        x = {}
        for organ in ("kidney_left", "kidney_right", "liver", "spleen"):
            voxels = np.argwhere(case.label == ORGAN_IDS[organ])
            assert len(voxels) > 10, (case_id, organ)
            x[organ] = (case.geometry.canonical_affine @ np.c_[voxels, np.ones(len(voxels))].T)[0].mean()
        # RAS+: the patient's left kidney (and spleen) lie at smaller x than the right kidney (and liver).
        assert x["kidney_left"] < x["kidney_right"] - 5, (case_id, phantom.orientation)
        assert x["spleen"] < x["liver"] - 5
    assert {"LPS", "RAS"} <= orientations


def test_background_mapped_source_ids_become_background(btcv: Layout, atlas8k: Layout) -> None:
    for (root, phantoms), cls in ((btcv, BTCVDataModule), (atlas8k, Atlas8kDataModule)):
        dm = _dm(cls, root)
        for case_id, phantom in list(phantoms.items())[:2]:
            assert phantom.extra.sum() > 0
            assert (dm.load_case(case_id).label[phantom.extra] == 0).all()


def test_reorientation_round_trip_gives_the_stored_arrays(btcv: Layout) -> None:
    import nibabel as nib

    root, phantoms = btcv
    dm = _dm(BTCVDataModule, root)
    for case_id, phantom in phantoms.items():
        case = dm.load_case(case_id)
        image_file = nib.load(str(root / "RawData/Training/img" / f"img{case_id}.nii.gz"))
        stored = np.asanyarray(image_file.dataobj)
        from delinea.io import read_volume

        canonical = read_volume(case.path).array
        back = case.geometry.to_original(canonical)
        assert back.shape == stored.shape == case.geometry.original_shape
        np.testing.assert_array_equal(back, stored)
        np.testing.assert_allclose(case.geometry.original_affine, image_file.affine)
        label_back = case.geometry.to_original(case.label)
        np.testing.assert_array_equal(label_back, phantom.stored(phantom.label)[0])


def test_amos_modality_filter(amos: Layout) -> None:
    root, phantoms = amos
    both, ct, mr = (_dm(AMOSDataModule, root, modality=m) for m in ("both", "ct", "mr"))
    assert both.split == ct.split  # one split over all cases, filtered afterwards
    for split in ("train", "val", "test"):
        ids_ct, ids_mr, ids_both = (dm._split_ids(split) for dm in (ct, mr, both))
        assert all(int(c[-4:]) <= 500 for c in ids_ct) and all(int(c[-4:]) > 500 for c in ids_mr)
        assert sorted(ids_ct + ids_mr) == sorted(ids_both)
    ct.setup("fit")
    assert ct.train_cases() and all(phantoms[c].modality == "ct" for c in ct.train_cases() + ct.val_cases())
    assert {ct.load_case(c).modality for c in phantoms} == {"ct", "mr"}  # modality from the id
    with pytest.raises(ValueError, match="modality must be 'ct', 'mr' or 'both', got 'pet'"):
        AMOSDataModule(root=str(root), modality="pet")  # type: ignore[arg-type]  # the bad value under test


@pytest.mark.parametrize(
    ("fixture", "cls", "organ"),
    [("cirrmri600", CirrMRI600DataModule, "liver"), ("panseg", PanSegDataModule, "pancreas")],
)
def test_single_organ_sets_sequence_filter_and_labelled(
    request: pytest.FixtureRequest, fixture: str, cls: type, organ: str
) -> None:
    root, _phantoms = request.getfixturevalue(fixture)
    t1 = _dm(cls, root, sequence="t1")
    t2 = _dm(cls, root, sequence="t2")
    t1.setup("fit")
    assert all(c.startswith("t1_") for c in t1.train_cases() + t1.val_cases())
    assert all(c.startswith("t2_") for c in t2._split_ids("train"))
    expected = [name == organ for name in ORGANS]
    case = t1.load_case(t1.train_cases()[0])
    assert case.labelled.tolist() == expected and not case.labelled[0]  # background is not labelled
    assert set(np.unique(case.label)) == {0, ORGAN_IDS[organ]}
    batch = next(iter(t1.train_dataloader()))
    assert batch["labelled"].tolist() == [expected] * len(batch["case_id"])
    assert case.modality == "mr"


def test_multi_organ_sets_label_every_class(btcv: Layout) -> None:
    dm = _dm(BTCVDataModule, btcv[0])
    assert dm.load_case("0001").labelled.all()


def test_cirrmri_masks_of_255_are_liver(tmp_path: Path) -> None:
    from delinea.testing.phantoms import write_cirrmri600

    phantoms = write_cirrmri600(tmp_path, n_t1=1, n_t2=0)
    import nibabel as nib

    path = tmp_path / "Cirrhosis_T1_3D/train_masks/100.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image((np.asanyarray(img.dataobj) * 255).astype(np.uint8), img.affine), str(path))
    case = _dm(CirrMRI600DataModule, tmp_path).load_case("t1_100")
    np.testing.assert_array_equal(case.label, phantoms["t1_100"].label)


def test_fractions_are_seeded_nested_and_never_empty(folder: Layout) -> None:
    root, _ = folder
    train = {}
    for fraction in (0.01, 0.25, 0.5, 1.0):
        dm = _dm(FolderDataModule, root, fraction=fraction)
        train[fraction] = dm._split_ids("train")
        assert dm._split_ids("train") == _dm(FolderDataModule, root, fraction=fraction)._split_ids("train")
    assert [len(train[f]) for f in (0.01, 0.25, 0.5, 1.0)] == [1, 4, 8, 16]
    assert train[0.01] == train[0.25][:1] and train[0.25] == train[0.5][:4] and train[0.5] == train[1.0][:8]
    assert _dm(FolderDataModule, root, fraction=0.25, seed=3)._split_ids("train") != train[0.25]
    dm = _dm(FolderDataModule, root, fraction=0.25)
    assert dm._split_ids("val") == _dm(FolderDataModule, root)._split_ids("val")  # fraction touches train only
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"fraction must be in \(0, 1\], got {bad}"):
            _dm(FolderDataModule, root, fraction=bad)


def test_folder_auto_modality_and_all_split(folder: Layout) -> None:
    root, phantoms = folder
    dm = _dm(FolderDataModule, root, split="all")
    assert dm.split["train"] == dm.split["test"] == sorted(phantoms)
    assert {c: dm.load_case(c).modality for c in ("case00", "case01")} == {"case00": "mr", "case01": "ct"}
    forced = _dm(FolderDataModule, root, modality="ct", split="all")
    assert forced.load_case("case00").modality == "ct"


def test_folder_label_table(tmp_path: Path) -> None:
    from delinea.labels import TOTALSEG_CT
    from delinea.testing.phantoms import make_phantom, write_case

    phantom = make_phantom(0, "ct", "LPS")
    write_case(phantom, tmp_path / "images/a.nii.gz", tmp_path / "labels/a.nii.gz", TOTALSEG_CT)
    case = _dm(FolderDataModule, tmp_path, label_table=TOTALSEG_CT).load_case("a")
    np.testing.assert_array_equal(case.label, phantom.label)


def test_root_from_environment(btcv: Layout, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELINEA_BTCV_ROOT", str(btcv[0]))
    assert BTCVDataModule().root == btcv[0]
    monkeypatch.delenv("DELINEA_BTCV_ROOT")
    (tmp_path / "btcv").symlink_to(btcv[0])
    monkeypatch.setenv("DELINEA_DATA", str(tmp_path))
    assert BTCVDataModule().root == tmp_path / "btcv"
    monkeypatch.delenv("DELINEA_DATA")
    with pytest.raises(
        ValueError, match=r"btcv: no root given; pass root=\.\.\. or set DELINEA_BTCV_ROOT.*RawData/Training/img"
    ):
        BTCVDataModule()
    for name in ("atlas8k", "amos", "cirrmri600", "panseg"):
        assert DATAMODULES[name].env_var() == f"DELINEA_{name.upper()}_ROOT"


def test_batches_follow_the_contract(btcv: Layout) -> None:
    dm = BTCVDataModule(root=str(btcv[0]), resolution=32, batch_size=4)
    dm.setup("fit")
    train_keys, val_keys = set(), set()
    # The plan: the median in-plane spacing of the training phantoms (1.6 and 1.4 mm), windows of 32 px.
    for loader, keys in ((dm.train_dataloader(), train_keys), (dm.val_dataloader(), val_keys)):
        assert dm.plan == Plan({"ct": 1.5}, (32,))
        for batch in loader:
            b = len(batch["case_id"])
            # training: 32 x 32 windows; validation: whole slices at 1.5 mm, one case per batch: the phantom's body
            # fills its 38 x 28 mm field of view, so the slice is the lattice region of the body box + 10 mm
            size = (32, 32) if keys is train_keys else (40, 31)
            assert batch["image"].shape == (b, 1, *size) and batch["image"].dtype == torch.float32
            assert batch["image"].min() >= -1 and batch["image"].max() <= 1
            assert batch["mask"].shape == (b, *size) and batch["mask"].dtype == torch.int64
            assert 0 <= batch["mask"].min() and batch["mask"].max() <= 8
            assert batch["labelled"].shape == (b, 9) and batch["labelled"].dtype == torch.bool
            assert batch["slice_index"].dtype == torch.int64 and batch["slice_index"].shape == (b,)
            assert all(isinstance(c, str) for c in batch["case_id"])
            assert keys is train_keys or len(set(batch["case_id"])) == 1
            assert all(len(k) == 40 for k in batch["cache_key"])
            # exactly the keys of the stage's TypedDict: the contract mypy checks the tasks against is the true one
            assert set(batch) == set((TrainBatch if keys is train_keys else EvalBatch).__annotations__)
            if keys is val_keys:  # the slices on the scan's own grid, for 3D scores and figures
                x, y = dm.case_geometry(batch["case_id"][0]).canonical_shape[:2]
                assert batch["native_label"].shape == (b, x, y) and batch["native_label"].dtype == torch.uint8
                assert batch["native_image"].shape == (b, x, y) and batch["native_image"].dtype == torch.float32
            keys.update(batch["cache_key"])
    assert len(val_keys) == 6 * len(dm.val_cases())  # one key per whole slice
    assert len(train_keys) == 6 * len(dm.train_cases())  # one window per slice per epoch, each its own key
    # The CT window: -1000 HU air is -1, organ contrast is preserved in between.
    assert (batch["image"] == -1).any() and (batch["image"] > 0.3).any()
    assert Plan.load(dm.split_file.with_name(dm.split_file.stem + ".plan.json")) == dm.plan  # written beside


def test_cache_key_changes_with_what_changes_the_sample(btcv: Layout) -> None:
    root = str(btcv[0])
    ds = BTCVDataModule(root=root, resolution=[32, 64]).dataset("train")
    base = ds[(0, 32, 0)]["cache_key"]
    assert ds[(0, 32, 0)]["cache_key"] == base and ds[(0, 64, 0)]["cache_key"] != base
    assert ds[(1, 32, 0)]["cache_key"] != base
    assert len({ds[(0, 32, seed)]["cache_key"] for seed in range(20)}) > 5  # the window's place is in the key
    windowed = BTCVDataModule(root=root, resolution=32, window=(-100.0, 200.0)).dataset("train")
    assert windowed[(0, 32, 0)]["cache_key"] != base
    finer = BTCVDataModule(root=root, resolution=32, spacing=1.0).dataset("train")
    assert finer[(0, 32, 0)]["cache_key"] != base  # so is the plan's spacing
    augmented = BTCVDataModule(root=root, resolution=32, augment=True)
    assert augmented.dataset("train")[(0, 32, 0)]["cache_key"] == ""
    assert augmented.dataset("val")[0]["cache_key"] != ""  # validation is never augmented


def test_eval_loaders_are_case_by_case_in_slice_order(amos: Layout) -> None:
    dm = AMOSDataModule(root=str(amos[0]), resolution=48, batch_size=4)
    dm.setup("fit")
    dm.setup("test")
    for loader, cases in ((dm.val_dataloader(), dm.val_cases()), (dm.test_dataloader(), dm.test_cases())):
        seen = []
        assembler = VolumeAssembler(dm.case_geometry)
        for batch in loader:
            assert len(set(batch["case_id"])) == 1
            seen += list(zip(batch["case_id"], batch["slice_index"].tolist()))
            onehot = torch.nn.functional.one_hot(batch["mask"], 9).permute(0, 3, 1, 2).float()
            for case in assembler.add(batch, onehot, onehot[:, 0]):
                # the batches carry the case's own label and image slices: stacked, they are the case read whole
                whole = dm.load_case(case.case_id)
                label = whole.label
                np.testing.assert_array_equal(case.label, label)
                np.testing.assert_array_equal(case.image, whole.image.astype(np.float16))
                np.testing.assert_array_equal(case.labelled, whole.labelled)
                # the served masks, stacked and resampled back to the case's own grid, give its label (up to the
                # edges of these tiny phantoms' organs, some of them 3 pixels across)
                for organ in np.unique(label[label > 0]):
                    dice = (
                        2
                        * ((case.labels == organ) & (label == organ)).sum()
                        / ((case.labels == organ).sum() + (label == organ).sum())
                    )
                    assert dice >= 0.75, (case.case_id, organ, dice)
        assert seen == [(c, k) for c in cases for k in range(6)] and not assembler.incomplete()


def test_atlas_has_no_test_split(atlas8k: Layout) -> None:
    dm = _dm(Atlas8kDataModule, atlas8k[0])
    assert dm.test_cases() == []
    with pytest.raises(ValueError, match=r"atlas8k: the test split has no cases"):
        dm.test_dataloader()


def test_case_index_is_reused_and_refreshed_when_files_change(
    btcv_copy: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import delinea.datamodules.index as index_module

    root, _ = btcv_copy
    first = _dm(BTCVDataModule, root, empty_slice_ratio=0.5)
    first.prepare_data()  # what Lightning runs once per node before setup
    index_file = first.split_file.with_name(first.split_file.stem + ".cases.json")
    entries = json.loads(index_file.read_text())["cases"]
    assert sorted(entries) == ["0001", "0002", "0003", "0004", "0005"]
    train = first.split["train"]
    assert all(entries[c]["foreground"] == [1, 2, 3, 4] for c in train) and entries[train[0]]["slices"] == 6
    calls: list[str] = []
    real = index_module._inspect
    monkeypatch.setattr(index_module, "_inspect", lambda f, *a: calls.append(f.case_id) or real(f, *a))
    second = _dm(BTCVDataModule, root, empty_slice_ratio=0.5)
    second.setup("fit")
    assert calls == []  # every rank's setup reads the index instead of the files
    assert second._datasets["train"].foreground.sum() == 4 * len(train)
    label = root / "RawData/Training/label" / f"label{train[0]}.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))  # the file changed
    _dm(BTCVDataModule, root, empty_slice_ratio=0.5).setup("fit")
    assert calls == [train[0]]


def test_the_case_index_reads_each_case_once_across_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_data (foreground), planning (modality) and setup ask the index different questions; each case's label
    and image are read once, and a second datamodule over the same files reads nothing."""
    import delinea.datamodules.index as index
    from delinea.datamodules import FolderDataModule
    from delinea.datamodules.batches import give_plan
    from delinea.testing.phantoms import write_folder

    reads = {"read_volume": 0, "read_label": 0}
    for name in reads:
        original = getattr(index, name)
        monkeypatch.setattr(index, name, lambda *a, _f=original, _n=name, **k: reads.__setitem__(_n, reads[_n] + 1)
                            or _f(*a, **k))  # fmt: skip
    write_folder(tmp_path / "d", {f"c{i}": "ct" for i in range(6)})
    for _ in range(2):
        data = FolderDataModule(root=str(tmp_path / "d"), split_file=str(tmp_path / "s.json"), empty_slice_ratio=0.5,
                                resolution=32)  # fmt: skip
        data.prepare_data()
        give_plan(data, None, "fit")
        data.setup("fit")
        (tmp_path / "s.plan.json").unlink(missing_ok=True)
        training = len(json.loads((tmp_path / "s.json").read_text())["train"])
        assert 0 < training < 6 and reads == {"read_volume": training, "read_label": training}
