"""Aggregation on a hand-computed example, the writers, the DDP gather and the overlay figure."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from delinea.evaluation.metrics import OrganMetrics, case_metrics
from delinea.evaluation.report import (
    case_rows,
    gather_rows,
    markdown_table,
    save_overlays,
    summarize,
    write_reports,
)
from delinea.labels import FOREGROUND

NAN = math.nan


def _case(status_default: str, **organs: tuple[float, float, float, str]) -> dict[str, OrganMetrics]:
    out = {}
    for organ in FOREGROUND:
        if organ in organs:
            d, h, a, s = organs[organ]
            out[organ] = OrganMetrics(dice=d, hd95=h, assd=a, status=s)  # type: ignore[typeddict-item]  # status from a str table
        else:
            out[organ] = OrganMetrics(dice=NAN, hd95=NAN, assd=NAN, status=status_default)  # type: ignore[typeddict-item]  # as above
    return out


def _rows():
    a = _case(
        "both_empty",
        liver=(0.9, 2.0, 1.0, "ok"),
        spleen=(0.8, 4.0, 2.0, "ok"),
        kidney_left=(0.0, 100.0, 100.0, "pred_empty"),
    )
    b = _case("both_empty", liver=(0.7, 6.0, 3.0, "ok"), kidney_left=(0.6, 2.0, 1.0, "ok"))
    c = _case("unlabelled", liver=(0.5, 10.0, 5.0, "ok"))
    return case_rows("A", a) + case_rows("B", b) + case_rows("C", c)


def test_summary_matches_hand_computation() -> None:
    s = summarize(_rows())
    liver, spleen, kid = s["organs"]["liver"], s["organs"]["spleen"], s["organs"]["kidney_left"]
    assert (liver["dice"], liver["hd95"], liver["assd"], liver["n"]) == pytest.approx((0.7, 6.0, 3.0, 3))
    assert (spleen["dice"], spleen["hd95"], spleen["assd"], spleen["n"]) == pytest.approx((0.8, 4.0, 2.0, 1))
    assert (spleen["both_empty"], spleen["unlabelled"]) == (1, 1)
    assert (kid["dice"], kid["hd95"], kid["assd"], kid["n"]) == pytest.approx((0.3, 51.0, 50.5, 2))
    assert kid["pred_empty"] == 1
    assert s["organs"]["aorta"] == {
        "dice": None, "hd95": None, "assd": None, "n": 0,
        "pred_empty": 0, "gt_empty": 0, "both_empty": 2, "unlabelled": 1,
    }  # fmt: skip
    assert s["mDSC"] == pytest.approx((0.7 + 0.8 + 0.3) / 3)
    assert s["mHD95"] == pytest.approx((6.0 + 4.0 + 51.0) / 3)
    assert s["mASSD"] == pytest.approx((3.0 + 2.0 + 50.5) / 3)
    assert s["excluded"] == {"both_empty": 11, "unlabelled": 7}
    assert (s["penalised"], s["cases"]) == (1, 3)
    md = markdown_table(s)
    assert "| liver | 3 | 70.00 | 6.00 | 3.00 |" in md and "| aorta | 0 | – | – | – |" in md
    assert "| delinea | 60.00 |" in md


def test_single_organ_dataset_mdsc_is_that_organs_dsc() -> None:
    rows = case_rows("x", _case("unlabelled", pancreas=(0.42, 3.0, 1.0, "ok")))
    s = summarize(rows)
    assert s["mDSC"] == pytest.approx(0.42) and s["excluded"]["unlabelled"] == 7


def test_writers_and_overwrite_refusal(tmp_path: Path) -> None:
    rows = _rows()
    paths = write_reports(rows, tmp_path / "run")
    assert all(p.exists() for p in paths.values())
    with paths["csv"].open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 3 * len(FOREGROUND)
    assert lines[0].keys() == {"case", "organ", "status", "dice", "hd95", "assd"}
    assert math.isnan(float(lines[1]["dice"]))  # aorta of case A: both empty
    summary = json.loads(paths["json"].read_text())  # strict JSON: no NaN tokens
    assert {"organs", "mDSC", "mHD95", "mASSD", "excluded", "cases"} <= summary.keys()
    assert set(summary["organs"]) == set(FOREGROUND)
    assert {"dice", "hd95", "assd", "n"} <= summary["organs"]["liver"].keys()
    before = paths["markdown"].read_text()
    paths["csv"].unlink()  # a refusal must leave everything untouched even if only one file exists
    with pytest.raises(FileExistsError, match=r"metrics_summary\.json"):
        write_reports(rows[:3], tmp_path / "run")
    assert not paths["csv"].exists() and paths["markdown"].read_text() == before
    write_reports(rows[:8], tmp_path / "run", overwrite=True)
    assert json.loads(paths["json"].read_text())["cases"] == 1


def _key(rows):
    return [(r["case"], r["organ"], r["status"], *(repr(r[m]) for m in ("dice", "hd95", "assd"))) for r in rows]


def test_gather_rows_dedupes_without_and_with_process_group(tmp_path: Path) -> None:
    rows = _rows()
    b_repeat = [r for r in rows if r["case"] == "B"]
    padded = list(reversed(rows)) + b_repeat  # DistributedSampler-style repeated case, out of order
    assert _key(gather_rows(padded)) == _key(rows)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert _key(gather_rows(padded)) == _key(rows)  # rows went through pickling: compare NaN-safely
    finally:
        dist.destroy_process_group()


def test_metrics_to_reports_end_to_end(tmp_path: Path) -> None:
    gt = np.zeros((12, 10, 6), np.uint8)
    gt[2:6, 2:6, 1:4] = 5
    pred = gt.copy()
    pred[6, 2:6, 1:4] = 5
    rows = gather_rows(case_rows("case0", case_metrics(pred, gt, (1.0, 1.0, 2.0))))
    s = summarize(rows)
    assert s["organs"]["liver"]["dice"] == pytest.approx(2 * 48 / (48 + 60))
    assert s["excluded"]["both_empty"] == 7


def test_save_overlays_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 16, 8)).astype(np.float32)
    gt = np.zeros((20, 16, 8), np.uint8)
    gt[4:10, 3:8, 2:6] = 5
    gt[12:15, 9:12, 3:5] = 7
    pred = np.roll(gt, 1, axis=0)
    path = save_overlays(image, gt, pred, tmp_path / "fig" / "case0", n_slices=3, spacing=(0.8, 0.8, 3.0))
    assert path == tmp_path / "fig" / "case0.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError, match=r"case0\.png"):
        save_overlays(image, gt, pred, tmp_path / "fig" / "case0")
    # no ground truth (predict) and nothing predicted: still a figure, of the middle slice
    empty = save_overlays(image, None, np.zeros_like(gt), tmp_path / "empty")
    assert empty.exists()
