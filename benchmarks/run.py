"""``make bench``: how many scans delinea trains on and segments per hour, against the UNet baseline.

    .venv/bin/python benchmarks/run.py                  # everything (aim: 15 min on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick          # the same pieces at small sizes (1-2 min)
    .venv/bin/python benchmarks/run.py --sections flops fastpaths --checkpoint delinea/demo/weights/meddelinea

Sections (each prints markdown tables; the JSON is rewritten after each one):

1. ``training``: slices/s and peak memory of a training step at 256² for the tiny, S and B presets: MedDelinea
   encoding through the VAE every step, MedDelinea on the latent cache, the MONAI UNet (benchmarks/training.py);
2. ``inference``: seconds per slice and per volume of every scheduler x {1, 5, 10, 20, 50} steps x ensemble
   {1, 5} with the Dice reached on the held-out CT slab, the default chosen from that curve, and the whole
   CT volume with it against the UNet (benchmarks/inference.py, models from benchmarks/models.py);
3. ``fastpaths``: SDPA, bf16, channels_last, inference_mode, torch.compile, each against fp32 eager in the
   same run (benchmarks/fastpaths.py);
4. ``flops``: achieved FLOP/s of the DiT-B/2 forward against a matmul peak measured in the same run
   (benchmarks/flops.py);
5. ``threads`` (only when asked for): OpenMP wait policy x threads, each in its own process (benchmarks/threads.py);
6. ``paper`` (by default on CUDA only): the paper's network (DiT-XL/2, SD VAE, K = 15), one bf16 training step at
   256² and 512² with the configs' micro-batches, with and without activation checkpointing, samples/s and peak
   memory against the memory plan, and sampling seconds per slice and per 100-slice volume against the UNet
   (benchmarks/paper.py; under 8 minutes on one GPU);
7. ``memory`` (only when asked for): what each part keeps for the backward pass per sample at 256² and 512², fp32
   and bf16, with and without checkpointing, and the paper's memory plan (benchmarks/memory.py; 512² needs
   about 13 GiB).
8. ``loader``: training samples/s per loader worker at 256² and 512² with the paper's augmentation, from .nii.gz
   and from the slice store, whole-volume reads per case per epoch per sampler configuration, worker memory,
   preprocessing time and store size, and the workers per GPU against an A6000's and an H100's demand, on CTs it
   writes (512 x 512 x 300; benchmarks/loader.py; ``--loader-baseline REF`` times another commit's loader too).

Figures are medians of several timed runs; comparisons are ratios of runs interleaved in this one process
(benchmarks/common.py). On CUDA the same script runs with bf16 autocast and flash attention.

CPU threads: unless OMP_WAIT_POLICY is already set, this script sets it to PASSIVE before torch loads. With the
default (spinning) policy, on a machine whose cores are shared with other jobs, a 2-thread step measured
2-7x slower than with PASSIVE: the benchmark would time OpenMP's spinning, not delinea. ``--omp-active``
keeps the default; the JSON records which one ran.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/run.py` from anywhere

import torch

from benchmarks import fastpaths, flops, inference, loader, memory, models, paper, threads, training
from benchmarks.common import describe_device, native_bf16, pick_device, table, write_json

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("flops", "fastpaths", "inference", "training", "loader")  # the default; "threads" is optional

# Sizes per mode. ``full`` is `make bench`; ``quick`` the smoke version; ``tiny`` what tests/test_bench.py runs.
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "training": {
            "presets": ["tiny", "S", "B"],
            "resolution": 256,
            "batch_size": 2,
            "repeats": 3,
            "diff_only": ("B",),
        },
        "inference": {
            "resolution": 128,
            "repeats": 3,
            "steps": (1, 5, 10, 20, 50),
            "ensembles": (1, 5),
            "schedulers": None,
            "train_seconds": 60.0,
        },
        "fastpaths": {"preset": "B", "resolution": 256, "batch": 4, "repeats": 3, "compile": True},
        "flops": {"preset": "DiT-B/2", "latent": 32, "batch": 8, "repeats": 3},
        "paper": {"dit": "DiT-XL/2", "vae": "sd", "control_blocks": 15, "micro_batch": {256: 32, 512: 8}, "steps": 3},
        "memory": {"dit": "DiT-XL/2", "vae": "sd", "resolutions": (256, 512), "bf16_decoder_at": 64},
        "loader": {"cases": 6, "shape": [512, 512, 300], "count": 20, "rounds": 3},
    },
    "quick": {
        "loader": {"cases": 3, "shape": [256, 256, 60], "count": 10, "rounds": 2},
        "training": {"presets": ["tiny"], "resolution": 128, "batch_size": 2, "repeats": 3},
        "inference": {
            "resolution": 128,
            "repeats": 2,
            "steps": (1, 10),
            "ensembles": (1, 5),
            "schedulers": ["euler_ancestral", "ddim"],
            "train_seconds": 10.0,
        },
        "fastpaths": {
            "preset": "tiny",
            "resolution": 128,
            "batch": 4,
            "repeats": 2,
            "compile": False,
            "sample_steps": 5,
        },
        "flops": {"preset": "DiT-S/2", "latent": 32, "batch": 4, "repeats": 3},
    },
    "tiny": {
        "training": {"presets": ["toy"], "resolution": 32, "batch_size": 2, "repeats": 2},
        "inference": {
            "resolution": 32,
            "repeats": 2,
            "steps": (1, 2),
            "ensembles": (1, 2),
            "schedulers": ["ddim", "euler_ancestral"],
            "train_seconds": 1.0,
            "tiny": True,
            "chunk": 112,
        },
        "fastpaths": {"preset": "toy", "resolution": 32, "batch": 2, "repeats": 2, "compile": False},
        "flops": {"preset": "DiT-tiny/2", "latent": 8, "batch": 2, "repeats": 2},
        "paper": {
            "dit": "DiT-tiny/2",
            "vae": "tiny",
            "control_blocks": 2,
            "micro_batch": {32: 2, 64: 1},
            "steps": 1,
            "sampling_steps": 2,
            "volume_slices": 4,
            "volume_batch": 2,
            "unet_channels": [4, 8, 16],
        },
        "memory": {"dit": "DiT-tiny/2", "vae": "tiny", "resolutions": (32, 64), "bf16_decoder_at": 16},
        "loader": {"cases": 2, "shape": [64, 64, 6], "count": 2, "rounds": 1},
    },
}
MODES["quick"] |= {"paper": MODES["tiny"]["paper"], "memory": MODES["tiny"]["memory"]}  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about 1-2 minutes")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # test sizes (tests/test_bench.py)
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=(*SECTIONS, "threads", "paper", "memory"),
        default=None,
        help="sections to run (default: the four of the issue; 'threads' measures OpenMP's wait "
        "policy and thread count in separate processes)",
    )
    parser.add_argument(
        "--checkpoint",
        help="MedDelinea checkpoint or model folder for section 2 (default: the shipped pretrained demo model "
        "delinea/demo/weights/meddelinea, else a control branch trained here for --train-seconds)",
    )
    parser.add_argument(
        "--unet-checkpoint", help="UNet checkpoint or model folder for section 2 (default: the shipped one)"
    )
    parser.add_argument("--train-seconds", type=float, help="training budget per model when no checkpoint")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--omp-active", action="store_true", help="keep OpenMP's default spin-waiting policy")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (default per mode: 3, tiny 2)")
    parser.add_argument(
        "--dice-tolerance",
        type=float,
        default=0.02,
        help="default sampler: fastest setting within this mDSC of the best",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/latest.json; quick.json with --quick)"
    )
    parser.add_argument(
        "--loader-baseline",
        help="section 8: a git ref whose loader is timed as 'before' in processes interleaved with this tree's",
    )
    parser.add_argument(
        "--update", action="store_true", help="start from the JSON at --out and replace only the sections run now"
    )
    return parser.parse_args(argv)


def _dtype_name(device: torch.device) -> str:
    return "bfloat16 autocast" if device.type == "cuda" else "float32"


def render_training(result: dict[str, Any]) -> str:
    rows = [row for preset in result["presets"] + result["diff_only"] for row in preset["rows"]]
    text = table(
        rows,
        [
            "preset",
            "mode",
            "dit",
            "vae",
            "resolution",
            "batch",
            "step_s",
            "slices_per_s",
            "vs_encode",
            "peak_mib",
            "runs",
        ],
        "1. Training throughput (one optimiser step)",
    )
    summary = [
        {
            "preset": p["preset"],
            "cache_speedup": p["cache_speedup"],
            "cache_speedup_of_medians": p["cache_speedup_of_medians"],
            "cache_step_over_unet_step": p["unet_over_cache"],
            "bf16_speedup_of_cache": p["bf16_speedup_of_cache"],
            "trainable_params": p["parameters"]["trainable"],
            "dit_params": p["parameters"]["dit"],
            "vae_params": p["parameters"]["vae"],
        }
        for p in result["presets"] + result["diff_only"]
    ]
    text += "\n" + table(summary, list(summary[0]), "1b. Latent cache speedup (paired ratio, same run)")
    return (
        text + f"\nstep_s: median seconds of one step; vs_encode: paired ratio to the encode mode. Peak memory: "
        f"{result['memory']}.\n"
    )


def render_inference(result: dict[str, Any]) -> str:
    text = table(
        result["grid"],
        ["scheduler", "steps", "ensemble", "s_per_slice", "s_per_volume", "mDSC"],
        "2. Inference on the held-out CT slab (one run per setting)",
    )
    text += "\n" + table(
        result["headline"],
        ["model", "s_per_volume", "s_per_slice", "mDSC", "volume_vs_unet", "slice_vs_unet", "runs"],
        f"2b. Whole CT volume ({result['volume_slices']} slices at {result['resolution']}²), side by side",
    )
    return (
        text + f"\nDefault sampler: {result['default_sampler']} ({result['rule']}). Precision: "
        f"{result.get('inference_dtype', '?')}.\n"
    )


def render_fastpaths(result: dict[str, Any]) -> str:
    text = ""
    for workload in result["workloads"].values():
        columns = ["variant", "seconds", "speedup", "runs"]
        columns += ["agreement", "mDSC"] if "agreement" in workload["rows"][0] else ["max_rel_diff"]
        title = f"3. Fast paths: {workload['workload']}"
        if "compile_seconds" in workload:
            title += f" (compile took {workload['compile_seconds']} s)"
        text += table(workload["rows"], columns, title) + "\n"
        if "attention_processors" in workload:
            text += f"Attention processors in the blocks: {', '.join(workload['attention_processors'])}\n\n"
    return text


def render_flops(result: dict[str, Any]) -> str:
    return table(
        result["rows"],
        [
            "preset",
            "dtype",
            "batch",
            "tokens",
            "gflop_per_forward",
            "forward_s",
            "dit_gflops",
            "peak_gflops",
            "peak_shape",
            "fraction_of_peak",
            "fraction_paired",
            "runs",
        ],
        "4. DiT forward against the matmul peak",
    )


def render_threads(result: dict[str, Any]) -> str:
    return table(
        result["rows"],
        [
            "omp_wait_policy",
            "threads",
            "load_average",
            "unet_step",
            "unet_step_speedup",
            "vae_encode",
            "vae_encode_speedup",
        ],
        "5. OpenMP wait policy and threads (separate processes, one after the other)",
    )


RENDER = {
    "training": render_training,
    "inference": render_inference,
    "fastpaths": render_fastpaths,
    "flops": render_flops,
    "threads": render_threads,
    "loader": loader.render,
}


def render(result: dict[str, Any]) -> str:
    """The whole report as markdown (what `make bench` printed, for every section in the JSON)."""
    device = result["device"]
    lines = [
        f"# delinea benchmarks ({result['mode']})",
        "",
        f"Device: {device['name']} ({device['type']}, {device['threads']} threads, "
        f"OMP_WAIT_POLICY={result['omp_wait_policy']}); models for sections 2-3: {result.get('models', '–')}.",
        "Figures are medians of the runs given; ratios are paired ratios of runs interleaved in one process.",
        "",
    ]
    for section in ("training", "inference", "fastpaths", "flops", "threads", "loader"):
        if section in result:
            lines.append(RENDER[section](result[section]))
    lines.append("## Targets\n")
    lines += [f"- {name}: {json.dumps(value)}" for name, value in result.get("targets", {}).items()]
    return "\n".join(lines) + "\n"


def targets(result: dict[str, Any]) -> dict[str, Any]:
    out = loader.targets(result["loader"]) if "loader" in result else {}
    if "cache_speedup" in result:
        out["latent_cache_at_least_3x"] = {"value": result["cache_speedup"], "met": result["cache_speedup"] >= 3}
    if "dit_fraction_of_matmul_peak" in result:
        value = result["dit_fraction_of_matmul_peak"]
        out["dit_at_least_half_of_matmul_peak"] = {"value": value, "met": value >= 0.5}
    if "default_seconds_per_volume" in result:
        ratio = result["inference"]["default_over_unet_time"]
        out["default_within_5x_unet_at_equal_dice"] = {
            "time_ratio": ratio,
            "default_dice": result["default_dice"],
            "unet_dice": result["unet_dice"],
            "met": ratio <= 5 and result["default_dice"] >= result["unet_dice"],
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    config = MODES[mode]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.sections is None:  # the default; on CUDA also the paper's network
        args.sections = list(SECTIONS) + (["paper"] if device.type == "cuda" else [])
    out = args.out or RESULTS / ("latest.json" if mode == "full" else f"{mode}.json")
    started = time.perf_counter()
    result: dict[str, Any] = json.loads(out.read_text()) if args.update and out.is_file() else {"sections": {}}
    result |= {
        "device": describe_device(device),
        "mode": mode,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "precision": {
            "training": _dtype_name(device),
            "inference": "MedDelineaTask inference_dtype (see inference.inference_dtype)",
        },
        "argv": sys.argv[1:] if argv is None else argv,
    }
    print(
        f"# delinea benchmarks ({mode}) on {result['device']['name']} ({device.type}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={result['omp_wait_policy']})\n",
        flush=True,
    )

    def repeats(section: str) -> int:
        return args.repeats or config[section]["repeats"]

    def done(section: str, seconds: float) -> None:
        result["sections"][section] = {
            "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        result["last_update_seconds" if args.update else "total_seconds"] = round(time.perf_counter() - started, 1)
        result["targets"] = targets(result)
        write_json(result, out)
        out.with_suffix(".md").write_text(render(result))
        print(f"[{section}: {seconds:.0f} s]\n", flush=True)

    if "flops" in args.sections:
        t0 = time.perf_counter()
        c = config["flops"]
        dtypes = (
            (torch.bfloat16, torch.float32)
            if device.type == "cuda"
            else ((torch.float32, torch.bfloat16) if native_bf16("cpu") else (torch.float32,))
        )
        result["flops"] = flops.run(device, c["preset"], c["latent"], c["batch"], repeats("flops"), dtypes)
        result["dit_fraction_of_matmul_peak"] = result["flops"]["rows"][0]["fraction_of_peak"]
        result["dit_fraction_preset"] = f"{c['preset']} {result['flops']['rows'][0]['dtype']}"
        print(render_flops(result["flops"]))
        done("flops", time.perf_counter() - t0)

    md = unet = data = None
    if {"inference", "fastpaths"} & set(args.sections):
        t0 = time.perf_counter()
        c = config["inference"]
        data = models.load_ct(c["resolution"])
        md, unet, info = models.get_models(
            data,
            device,
            args.checkpoint,
            args.unet_checkpoint,
            args.train_seconds if args.train_seconds is not None else c["train_seconds"],
            tiny=c.get("tiny", False),
        )
        result["models"] = info.pop("summary")
        result["model_details"] = info
        print(f"Models for sections 2-3: {result['models']}\n", flush=True)
        result["sections"]["models"] = {"seconds": round(time.perf_counter() - t0, 1)}

    if "fastpaths" in args.sections:
        t0 = time.perf_counter()
        c = config["fastpaths"]
        result["fastpaths"] = fastpaths.run(
            device,
            md,
            unet,
            data,
            c["preset"],
            c["resolution"],
            c["batch"],
            repeats("fastpaths"),
            compile=c["compile"],
            sample_steps=c.get("sample_steps", 10),
        )
        print(render_fastpaths(result["fastpaths"]))
        done("fastpaths", time.perf_counter() - t0)

    if "inference" in args.sections:
        t0 = time.perf_counter()
        c = config["inference"]
        inf = inference.run(
            md,
            unet,
            data,
            device,
            repeats("inference"),
            args.dice_tolerance,
            c["schedulers"],
            c["steps"],
            c["ensembles"],
            chunk=c.get("chunk", 16),
        )
        result["inference"] = inf
        for key in (
            "default_sampler",
            "default_seconds_per_volume",
            "default_dice",
            "unet_seconds_per_volume",
            "unet_dice",
        ):
            result[key] = inf[key]
        print(render_inference(inf))
        done("inference", time.perf_counter() - t0)

    if "training" in args.sections:
        t0 = time.perf_counter()
        c = config["training"]
        dtype = torch.bfloat16 if device.type == "cuda" else None
        train = training.run(
            device,
            c["presets"],
            c["resolution"],
            c["batch_size"],
            repeats("training"),
            dtype,
            unet_channels=[4, 8, 16] if mode == "tiny" else None,
            diff_only_presets=c.get("diff_only", ()),
            bf16_row=device.type == "cpu" and native_bf16("cpu"),
        )
        result["training"] = train
        headline = train["presets"][-1]  # the largest preset measured (B in the full run)
        result["cache_speedup"] = headline["cache_speedup"]
        result["cache_speedup_preset"] = f"{headline['preset']} at {headline['resolution']}²"
        result["cache_speedup_by_preset"] = {
            p["preset"]: p["cache_speedup"] for p in train["presets"] + train["diff_only"]
        }
        print(render_training(train))
        done("training", time.perf_counter() - t0)

    if "paper" in args.sections:
        t0 = time.perf_counter()
        c = dict(config["paper"])
        dtype = torch.bfloat16 if device.type == "cuda" else None
        result["paper"] = paper.run(device, dtype=dtype, **c)
        print(paper.render(result["paper"]) + "\n")
        done("paper", time.perf_counter() - t0)

    if "memory" in args.sections:
        t0 = time.perf_counter()
        c = config["memory"]
        table = memory.profiles(device, tuple(c["resolutions"]), c["dit"], c["vae"], c["bf16_decoder_at"])
        result["memory"] = {"parts": table, "paper_plans": memory.paper_plans()}
        print(memory.render(table) + "\n")
        done("memory", time.perf_counter() - t0)

    if "loader" in args.sections:
        t0 = time.perf_counter()
        c = config["loader"]
        result["loader"] = loader.run(c["cases"], c["shape"], c["count"], c["rounds"], args.loader_baseline)
        print(loader.render(result["loader"]))
        done("loader", time.perf_counter() - t0)

    if "threads" in args.sections:
        t0 = time.perf_counter()
        result["threads"] = threads.run(repeats=args.repeats or 5)
        print(render_threads(result["threads"]))
        done("threads", time.perf_counter() - t0)

    print("## Targets\n")
    for name, value in result["targets"].items():
        print(f"- {name}: {json.dumps(value)}")
    print(f"\nWrote {out} and {out.with_suffix('.md')} ({time.perf_counter() - started:.0f} s)")
    return result


if __name__ == "__main__":
    main()
