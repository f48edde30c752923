"""`make bench` at test sizes: every section runs, the JSON has the keys the issue asks for, numbers are sane."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import run
from benchmarks.common import PeakMemory, paired_ratio, side_by_side
from benchmarks.inference import choose_default
from benchmarks.training import balanced_seed

REQUIRED = (
    "cache_speedup",
    "dit_fraction_of_matmul_peak",
    "default_sampler",
    "default_seconds_per_volume",
    "default_dice",
    "unet_seconds_per_volume",
    "unet_dice",
    "device",
    "models",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run tiny tensors: with 2 OpenMP threads spinning on a shared, loaded machine they took 6 s
    each instead of 0.1 s (OMP_WAIT_POLICY is read once, when torch loads, so a test cannot set it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``benchmarks/run.py --tiny`` as `make bench` runs it: its own process, so it sets OMP_WAIT_POLICY itself."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, str(Path(run.__file__)), "--tiny", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "## Targets" in done.stdout and "| fp32_eager |" in done.stdout  # the markdown tables were printed
    written = json.loads(out.read_text())
    assert written["mode"] == "tiny" and written["omp_wait_policy"] == "PASSIVE"
    return written


def test_json_has_the_issue_keys(result: dict) -> None:
    for key in REQUIRED:
        assert key in result, key
    assert set(result["default_sampler"]) == {"scheduler", "steps", "ensemble"}
    assert result["device"]["type"] in ("cpu", "cuda")
    assert "trained for" in result["models"]
    assert set(result["targets"]) == {
        "latent_cache_at_least_3x",
        "dit_at_least_half_of_matmul_peak",
        "default_within_5x_unet_at_equal_dice",
        "store_256_augmented_at_least_50_per_s",
        "store_512_augmented_at_least_25_per_s",
        "nifti_reads_per_case_at_most_1.5",
        "store_worker_memory_at_most_300_mb",
        "8_h100_paper_mix_at_most_3_workers_per_gpu",
    }


def test_timings_are_positive_and_finite(result: dict) -> None:
    for key in (
        "cache_speedup",
        "dit_fraction_of_matmul_peak",
        "default_seconds_per_volume",
        "unet_seconds_per_volume",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    for section in ("training", "inference", "fastpaths", "flops"):
        numbers = _numbers(result[section])
        assert numbers and all(math.isfinite(x) for x in numbers), section
    for preset in result["training"]["presets"]:
        for row in preset["rows"]:
            assert row["step_s"] > 0 and row["slices_per_s"] > 0 and row["peak_mib"] > 0  # a step allocates
        assert preset["cache_hits_in_timed_steps"] > 0  # the cached mode really read the cache
    for row in result["inference"]["grid"]:
        assert row["s_per_slice"] > 0 and 0 <= row["mDSC"] <= 1
    assert 0 <= result["default_dice"] <= 1 and 0 <= result["unet_dice"] <= 1
    for workload in result["fastpaths"]["workloads"].values():
        assert workload["rows"][0]["variant"] == "fp32_eager"
        assert all(row["speedup"] > 0 for row in workload["rows"])
    for row in result["flops"]["rows"]:
        assert row["gflop_per_forward"] > 0 and row["peak_gflops"] > 0 and row["fraction_of_peak"] > 0


def test_default_is_the_fastest_within_tolerance() -> None:
    rows = [{"mDSC": 0.80, "s_per_slice": 1.0}, {"mDSC": 0.79, "s_per_slice": 0.5}, {"mDSC": 0.70, "s_per_slice": 0.1}]
    assert choose_default(rows, 0.02) is rows[1]
    assert choose_default(rows, 0.0) is rows[0]


def test_side_by_side_interleaves_and_pairs() -> None:
    import torch

    calls: list[str] = []
    timing = side_by_side(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), repeats=2, warmup=1
    )
    assert calls == ["a", "b"] * 3 and len(timing["a"]["seconds"]) == 2
    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 1.0, 2.0]) == 3.0


def test_peak_memory_sees_a_large_allocation() -> None:
    import torch

    with PeakMemory(torch.device("cpu")) as peak:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert peak.mib > 32


def test_balanced_seed_halves_the_batch() -> None:
    import torch

    seed = balanced_seed(4, 500, torch.device("cpu"))
    t = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(seed))
    assert int((t < 500).sum()) == 2


# -- the fast path kept in the model: bf16 autocast sampling behind MedDelineaTask(inference_dtype=...) ----------


def _tiny_model():
    import torch

    from delinea.models import MaskVAE, MedDelinea, build_dit, build_vae
    from delinea.testing.backbones import pretrained_like

    torch.manual_seed(0)
    model = MedDelinea(build_dit("DiT-tiny/2", sample_size=16), MaskVAE(build_vae("tiny")), control_blocks=2).eval()
    return pretrained_like(model, std=0.02, only_zero=True)


def test_inference_dtype_names() -> None:
    import torch

    from delinea.models.meddelinea import inference_dtype

    assert inference_dtype("float32", "cpu") == torch.float32
    assert inference_dtype("bfloat16", "cpu") == torch.bfloat16
    assert inference_dtype("auto", "cpu") in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="inference_dtype 'fp8' must be one of auto, float32, bfloat16"):
        inference_dtype("fp8", "cpu")


def test_bf16_sampling_keeps_float32_outputs_and_the_segmentation() -> None:
    import torch

    model = _tiny_model()
    image = torch.rand(2, 1, 32, 32) * 2 - 1
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        runs[dtype] = model.sample(
            image, scheduler="ddim", steps=3, ensemble=2, dtype=dtype, generator=torch.Generator().manual_seed(0)
        )
    probabilities, uncertainty = runs[torch.bfloat16]
    assert probabilities.dtype == torch.float32 and uncertainty.dtype == torch.float32
    assert torch.allclose(probabilities.sum(1), torch.ones(2, 32, 32), atol=1e-5)
    reference = runs[torch.float32][0]
    assert (probabilities - reference).abs().max() < 0.05
    assert (probabilities.argmax(1) == reference.argmax(1)).float().mean() > 0.95


def test_float32_turns_a_callers_autocast_off_and_none_keeps_it() -> None:
    import torch

    model = _tiny_model()
    image = torch.rand(1, 1, 32, 32) * 2 - 1

    def run(dtype):
        return model.sample(image, scheduler="ddim", steps=2, dtype=dtype, generator=torch.Generator().manual_seed(0))[
            0
        ]

    plain = run(None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(run(torch.float32), plain)
        assert not torch.equal(run(None), plain)  # the caller's bf16 autocast applies


def test_task_validates_and_uses_inference_dtype() -> None:
    import torch

    from delinea.tasks import MedDelineaTask

    with pytest.raises(ValueError, match="inference_dtype"):
        MedDelineaTask(dit="DiT-tiny/2", vae="tiny", image_size=32, control_blocks=2, inference_dtype="half")
    image = torch.rand(2, 1, 32, 32) * 2 - 1
    out = {}
    for name in ("float32", "bfloat16"):
        torch.manual_seed(0)
        task = MedDelineaTask(
            dit="DiT-tiny/2", vae="tiny", image_size=32, control_blocks=2, sampling_steps=2, inference_dtype=name
        ).eval()
        out[name] = task.predict_probabilities(image)[0]
    assert out["bfloat16"].dtype == torch.float32
    assert not torch.equal(out["float32"], out["bfloat16"])  # the option reaches the sampler


def test_paper_section_runs_at_toy_size_on_the_cpu() -> None:
    """`make bench` on CUDA runs benchmarks/paper.py at the paper's size; its code path, at toy size here."""
    from benchmarks import paper

    result = paper.run(torch.device("cpu"), dtype=None, **run.MODES["tiny"]["paper"])
    assert [(r["resolution"], r["checkpointing"]) for r in result["rows"]] == [
        (32, []), (32, ["control", "base", "decoder"]), (64, []), (64, ["control", "base", "decoder"])
    ]  # fmt: skip
    for row in result["rows"]:
        assert row["samples_per_s"] > 0 and row["step_s"] > 0 and row["peak_gib"] > 0 and row["plan_gib"] > 0
    sampling = result["sampling"]
    assert sampling["s_per_slice"] > 0 and sampling["s_per_volume"] > 0 and sampling["unet_s_per_volume"] > 0
    assert "samples/s" in paper.render(result)


def test_memory_section_profiles_every_part_at_toy_size() -> None:
    from benchmarks import memory

    c = run.MODES["tiny"]["memory"]
    table = memory.profiles(torch.device("cpu"), c["resolutions"], c["dit"], c["vae"], c["bf16_decoder_at"])
    for dtype in ("fp32", "bf16"):
        for resolution in c["resolutions"]:
            parts = table[dtype][resolution]
            assert set(parts) == {"base", "control", "decoder"}
            for data in parts.values():
                assert data["kept"][1] > data["kept_checkpointed"][1] > 0
    assert table["fp32"][64]["decoder"]["kept"][1] > 3 * table["fp32"][32]["decoder"]["kept"][1]  # ~ pixels
    assert "| decoder | 32 | fp32 |" in memory.render(table)


def test_loader_section_reports_rates_reads_memory_and_targets(result: dict) -> None:
    from benchmarks.loader import CONFIGS

    loader = result["loader"]
    served = {(r["source"], r["window"], r["augment"]) for r in loader["rows"] if r["code"] == "current"}
    assert {("store", 256, True), ("store", 512, False), ("nifti_warm", 512, True), ("nifti_cold", 256, True)} <= served
    assert all(r["samples_per_s"] > 0 for r in loader["rows"])
    assert [r["configuration"] for r in loader["reads"]["current"]["bench_cases"]] == [c[0] for c in CONFIGS]
    assert loader["preprocess"]["store_mb_per_case"] > 0 and set(loader["memory_mib"]["current"]) >= {"store_augment"}
    assert "store_worker_memory_at_most_300_mb" in result["targets"] and "| nifti_cold |" in run.render(result)
