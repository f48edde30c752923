"""The per-dataset label tables against DESIGN.md section 2, and map_labels on large integer maps."""

from __future__ import annotations

import numpy as np
import pytest

from delinea.labels import AMOS, ATLAS8K, BTCV, ORGAN_IDS, map_labels

# Source ids by organ, copied from the DESIGN.md table (and the datasets' own documentation).
DESIGN = {
    "atlas8k": {"aorta": 1, "gallbladder": 2, "kidney_left": 3, "kidney_right": 4, "liver": 5, "pancreas": 6, "spleen": 8, "stomach": 9},
    "btcv": {"aorta": 8, "gallbladder": 4, "kidney_left": 3, "kidney_right": 2, "liver": 6, "pancreas": 11, "spleen": 1, "stomach": 7},
    "amos": {"aorta": 8, "gallbladder": 4, "kidney_left": 3, "kidney_right": 2, "liver": 6, "pancreas": 10, "spleen": 1, "stomach": 7},
}  # fmt: skip


@pytest.mark.parametrize(("name", "table"), [("atlas8k", ATLAS8K), ("btcv", BTCV), ("amos", AMOS)])
def test_tables_match_the_design(name: str, table: dict[int, int]) -> None:
    assert table == {source: ORGAN_IDS[organ] for organ, source in DESIGN[name].items()}


def test_map_labels_keeps_integer_dtypes_and_checks_values() -> None:
    label = np.random.default_rng(0).integers(0, 14, size=(64, 64, 32)).astype(np.uint8)
    mapped = map_labels(label, BTCV)
    assert mapped.dtype == np.uint8
    for source in range(14):
        assert (mapped[label == source] == BTCV.get(source, 0)).all()
    np.testing.assert_array_equal(map_labels(label.astype(np.float32), BTCV), mapped)
    np.testing.assert_array_equal(map_labels(label.astype(np.int16), BTCV), mapped)
    with pytest.raises(ValueError, match="non-negative integers"):
        map_labels(np.array([0.5, 1.0]), BTCV)
    with pytest.raises(ValueError, match="non-negative integers"):
        map_labels(np.array([-1, 2]), BTCV)
