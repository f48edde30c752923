"""Metrics against MONAI and medpy 0.5.2 on random and adversarial masks, and our empty-mask policy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from scipy import ndimage

from delinea.evaluation.metrics import (
    assd,
    case_metrics,
    empty_penalty,
    hd95,
    hd95_pooled,
    surface_distances,
)
from delinea.labels import FOREGROUND, NUM_CLASSES, only_labelled

SHAPE = (28, 24, 16)
ANISO = (0.8, 1.1, 2.5)


def _monai(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float]:
    """MONAI HD95 (max of directed P95) and symmetric ASSD (pooled mean) of two binary masks."""
    p = torch.from_numpy(pred)[None, None].float()
    g = torch.from_numpy(gt)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(spacing))
        a = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=list(spacing))
    return float(h), float(a)


def _blob(rng: np.random.Generator, shape=SHAPE, sigma: float = 2.0, q: float = 0.7) -> np.ndarray:
    """A random smooth blob: thresholded Gaussian-filtered noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, q)


def _sphere(center, radius, shape=SHAPE) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


def _pairs() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(3):
        cases[f"random{i}"] = (_blob(rng), _blob(rng), ANISO)
    g = _sphere((12, 12, 8), 6)
    p = _sphere((14, 11, 8), 5)
    cases["spheres_iso"] = (p, g, (1.0, 1.0, 1.0))
    cases["spheres_aniso"] = (p, g, ANISO)
    far = p.copy()
    far[27, 0, 15] = True  # one far false-positive voxel in the corner
    cases["far_fp"] = (far, g, ANISO)
    one_p = np.zeros(SHAPE, bool)
    one_p[3, 4, 5] = True
    one_g = np.zeros(SHAPE, bool)
    one_g[20, 2, 11] = True
    cases["single_voxels"] = (one_p, one_g, ANISO)
    cases["single_voxel_vs_sphere"] = (one_p, g, ANISO)
    border = np.zeros(SHAPE, bool)
    border[:6, :, :4] = True  # touches four faces of the volume
    border_p = np.zeros(SHAPE, bool)
    border_p[:7, 2:, :3] = True
    cases["border"] = (border_p, border, ANISO)
    full = np.ones(SHAPE, bool)
    cases["full_volume"] = (full, border, (1.0, 2.0, 3.0))
    return cases


PAIRS = _pairs()


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_surface_metrics_match_monai_and_medpy(name: str) -> None:
    pred, gt, spacing = PAIRS[name]
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    ours_hd, ours_assd = hd95(d_pg, d_gp), assd(d_pg, d_gp)
    monai_hd, monai_assd = _monai(pred, gt, spacing)
    # MONAI works in float32; same definitions, so only float32 rounding separates us
    assert ours_hd == pytest.approx(monai_hd, rel=1e-5, abs=1e-5)
    assert ours_assd == pytest.approx(monai_assd, rel=1e-5, abs=1e-5)
    # medpy 0.5.2: same surfaces and pooled ASSD; its hd95 pools the two directions (our hd95_pooled)
    assert ours_assd == pytest.approx(medpy_binary.assd(pred, gt, voxelspacing=spacing), rel=1e-12)
    assert hd95_pooled(d_pg, d_gp) == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), rel=1e-12)
    # Both exact distance methods, cropped or not, give the same numbers.
    for crop in (True, False):
        e_pg, e_gp = surface_distances(pred, gt, spacing, crop=crop, method="edt")
        np.testing.assert_allclose(np.sort(e_pg), np.sort(d_pg), rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.sort(e_gp), np.sort(d_gp), rtol=0, atol=1e-10)


def test_max_directed_hd95_differs_from_pooled_on_asymmetric_error() -> None:
    pred, gt, spacing = PAIRS["far_fp"]
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    # the far voxel is a few % of pred's surface: visible in the directed P95, diluted in medpy's pooled one
    assert hd95(d_pg, d_gp) > hd95_pooled(d_pg, d_gp)


def _label_maps() -> tuple[np.ndarray, np.ndarray]:
    """A two-organ case: liver present in both, spleen in both, kidney_left missed, stomach hallucinated."""
    gt = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    gt[_sphere((8, 8, 8), 5)] = 5  # liver
    pred[_sphere((9, 8, 8), 5)] = 5
    gt[_sphere((20, 16, 8), 3)] = 7  # spleen
    pred[_sphere((20, 17, 8), 3)] = 7
    gt[22:26, 3:6, 2:5] = 3  # kidney_left, missed by pred
    pred[2:4, 18:22, 10:13] = 8  # stomach, not in gt
    return pred, gt


def test_case_metrics_match_monai_per_organ_and_empty_policy() -> None:
    pred, gt = _label_maps()
    out = case_metrics(pred, gt, ANISO)
    assert list(out) == list(FOREGROUND)
    penalty = empty_penalty(SHAPE, ANISO)
    assert penalty == pytest.approx(math.sqrt((28 * 0.8) ** 2 + (24 * 1.1) ** 2 + (16 * 2.5) ** 2))
    for organ, c in (("liver", 5), ("spleen", 7)):
        m = out[organ]
        assert m["status"] == "ok"
        p, g = pred == c, gt == c
        assert m["dice"] == pytest.approx(medpy_binary.dc(p, g), rel=1e-12)
        monai_hd, monai_assd = _monai(p, g, ANISO)
        assert m["hd95"] == pytest.approx(monai_hd, rel=1e-5)
        assert m["assd"] == pytest.approx(monai_assd, rel=1e-5)
    assert out["kidney_left"] == {"dice": 0.0, "hd95": penalty, "assd": penalty, "status": "pred_empty"}
    assert out["stomach"] == {"dice": 0.0, "hd95": penalty, "assd": penalty, "status": "gt_empty"}
    for organ in ("aorta", "gallbladder", "kidney_right", "pancreas"):
        assert out[organ]["status"] == "both_empty"
        assert all(math.isnan(out[organ][k]) for k in ("dice", "hd95", "assd"))


def test_where_peers_break_on_empty_masks_we_are_finite() -> None:
    """MONAI gives NaN (HD95, silently dropped by its mean) / inf, medpy raises; we give the finite penalty."""
    pred, gt = _label_maps()
    p, g = pred == 3, gt == 3  # kidney_left: pred empty
    monai_hd, monai_assd = _monai(p, g, ANISO)
    assert math.isnan(monai_hd) and math.isinf(monai_assd)
    with pytest.raises(RuntimeError):
        medpy_binary.hd95(p, g, voxelspacing=ANISO)
    ours = case_metrics(pred, gt, ANISO)["kidney_left"]
    assert math.isfinite(ours["hd95"]) and math.isfinite(ours["assd"])
    # the penalty is worse than any distance possible in the volume, e.g. the far-corner voxel pair
    corner = np.zeros(SHAPE, bool)
    corner[0, 0, 0] = True
    other = np.zeros(SHAPE, bool)
    other[-1, -1, -1] = True
    assert hd95(*surface_distances(corner, other, ANISO)) < ours["hd95"]
    with pytest.raises(ValueError, match="empty"):
        surface_distances(p, g, ANISO)


def test_penalty_override_and_unlabelled() -> None:
    pred, gt = _label_maps()
    out = case_metrics(pred, gt, ANISO, labelled=only_labelled("liver", "kidney_left"), penalty=100.0)
    assert out["kidney_left"]["hd95"] == 100.0 and out["kidney_left"]["status"] == "pred_empty"
    assert out["liver"]["status"] == "ok"
    for organ in FOREGROUND:
        if organ not in ("liver", "kidney_left"):
            assert out[organ]["status"] == "unlabelled" and math.isnan(out[organ]["dice"])
    np_mask = np.zeros(NUM_CLASSES, bool)
    np_mask[5] = True
    assert case_metrics(pred, gt, ANISO, labelled=np_mask)["spleen"]["status"] == "unlabelled"


def test_crop_gives_identical_numbers() -> None:
    pred, gt = _label_maps()
    pred[27, 23, 15] = 5  # a far false positive stretches the liver's box to the opposite corner
    pred[0, 0, 0] = 7  # and the spleen touches the volume corner
    for method in ("kdtree", "edt"):
        cropped = case_metrics(pred, gt, ANISO, method=method)
        full = case_metrics(pred, gt, ANISO, crop=False, method=method)
        assert cropped.keys() == full.keys()
        for organ in cropped:
            for key in ("dice", "hd95", "assd"):
                np.testing.assert_array_equal(cropped[organ][key], full[organ][key])
            assert cropped[organ]["status"] == full[organ]["status"]


def test_bad_inputs_fail_early() -> None:
    pred, gt = _label_maps()
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(pred, gt[:-1], ANISO)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(pred, gt, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(pred, gt, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="label ids"):
        case_metrics(pred + 9, gt, ANISO)
    with pytest.raises(ValueError, match="integer"):
        case_metrics(pred.astype(np.float32), gt, ANISO)
    with pytest.raises(ValueError, match="labelled"):
        case_metrics(pred, gt, ANISO, labelled=np.ones(3, bool))
