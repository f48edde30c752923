"""Shared pieces of the benchmarks: device choice, timing, side-by-side comparisons, peak memory, tables.

Timing protocol (the machines are shared and their load changes from second to second):

* every figure is the **median** of several timed runs after untimed warm-up runs;
* every comparison is measured **side by side**: the variants run interleaved (A, B, C, A, B, C, ...) in one
  process, and the ratio reported is the median of the per-round ratios, so a load change hits both sides;
* on CUDA every timed region ends with ``torch.cuda.synchronize()``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (bytes held by
tensors). On CPU, torch's allocations are invisible to ``tracemalloc`` and ``ru_maxrss`` only ever grows, so a
thread samples the process's resident set size (``/proc/self/statm``) every millisecond while the timed code
runs; the figure is the highest sample minus the RSS just before (after ``gc.collect()`` and glibc's
``malloc_trim``), i.e. the extra memory the measured work needed on top of the weights already loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from delinea.models.meddelinea import native_bf16

MiB = 2**20


# -- device ----------------------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is visible, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no GPU")
    return device


def describe_device(device: torch.device) -> dict[str, Any]:
    """What the benchmark ran on, for the JSON."""
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    else:
        model = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        info |= {
            "name": model or platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_instructions": native_bf16("cpu"),
        }
        with contextlib.suppress(OSError, AttributeError):
            info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summary(values: Sequence[float], digits: int = 5) -> dict[str, Any]:
    """Median, min, max and count of timed runs (seconds)."""
    return {
        "median": round(median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": len(values),
    }


def side_by_side(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 3, warmup: int = 1, memory: bool = False
) -> dict[str, dict[str, Any]]:
    """Run the callables interleaved, ``warmup`` untimed rounds then ``repeats`` timed rounds.

    Returns per name: ``seconds`` (the timed runs), and with ``memory`` the peak memory of its runs (MiB, see
    the module docstring).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, dict[str, Any]] = {name: {"seconds": [], "peak_mib": 0.0} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if memory:
                with PeakMemory(device) as peak:
                    seconds = timed(fn, device)
                out[name]["peak_mib"] = max(out[name]["peak_mib"], peak.mib)
            else:
                seconds = timed(fn, device)
            out[name]["seconds"].append(seconds)
    return out


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios of two side-by-side series."""
    return median([a / b for a, b in zip(numerator, denominator) if b > 0])


# -- memory ------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next RSS baseline is honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PeakMemory:
    """Peak extra memory of a block: CUDA ``max_memory_allocated`` or sampled CPU RSS over the baseline."""

    device: torch.device
    interval: float = 0.001
    mib: float = 0.0
    baseline_mib: float = 0.0
    _peak: int = field(default=0, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            release_memory()
            self._base = self._peak = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:  # no /proc: nothing honest to measure
            self._base = 0
        self.baseline_mib = self._base / MiB
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / MiB
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.mib = (self._peak - self._base) / MiB


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during the timed steps minus memory allocated before (weights)"
    return (
        "CPU: peak of the process RSS sampled every 1 ms during the timed steps minus the RSS before them "
        "(after gc and malloc_trim); weights and optimizer state loaded before are not counted"
    )


# -- precision and kernels ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on the device, or nothing for None/float32."""
    if dtype is None or dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def flash_attention(device: torch.device) -> Iterator[None]:
    """On CUDA, restrict scaled-dot-product attention to the flash kernel (then memory-efficient); else no-op."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        yield


# -- output ------------------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and abs(value) < 10**-(digits):
            return f"{value:.{digits - 1}e}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write through a temporary file, so a killed run never leaves half a JSON behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(temporary, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (torch.device, torch.dtype, Path)):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
