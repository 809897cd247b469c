"""Clocks, memory probes and the description of the machine a benchmark ran on.

GPU work is asynchronous, so every GPU interval is bracketed by CUDA events and ends with a
synchronize; on CPU the wall clock is the truth. Peak memory comes from the CUDA allocator on GPU;
on CPU there is no allocator to ask, so a thread samples the process RSS instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from operators.native import ops as native_ops

RSS_SAMPLE_S = 0.005


class Stopwatch:
    """Times an interval on `device`: CUDA events + synchronize on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        self._started = time.perf_counter()

    def stop(self) -> float:
        """Seconds since `start` (waits for queued GPU work)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self._event.elapsed_time(end) / 1000
        return time.perf_counter() - self._started


@dataclass
class Window:
    """What one measured window used beyond what was allocated when it began."""

    start_bytes: int = 0
    end_bytes: int = 0
    peak_bytes: int = 0

    @property
    def growth(self) -> int:
        """Memory still held at the end (a cache, captured graphs)."""
        return self.end_bytes - self.start_bytes

    @property
    def transient(self) -> int:
        """The most memory held at once during the window."""
        return self.peak_bytes - self.start_bytes


class MemoryProbe:
    """Peak memory of a window: `torch.cuda.max_memory_allocated` on GPU; on CPU the process RSS
    sampled every few ms (after returning freed heap to the OS, so a window that reuses freed
    memory is still seen growing). `method` says which, for the report."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated"
        else:
            self.method = f"process RSS sampled every {RSS_SAMPLE_S * 1000:g} ms (approximate)"

    @contextlib.contextmanager
    def window(self) -> Iterator[Window]:
        window = Window()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            window.start_bytes = torch.cuda.memory_allocated(self.device)
            yield window
            torch.cuda.synchronize(self.device)
            window.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            window.end_bytes = torch.cuda.memory_allocated(self.device)
            return
        _trim_heap()
        window.start_bytes = window.peak_bytes = _rss()
        done = threading.Event()

        def sample() -> None:
            while not done.wait(RSS_SAMPLE_S):
                window.peak_bytes = max(window.peak_bytes, _rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield window
        finally:
            done.set()
            sampler.join()
            window.end_bytes = _rss()
            window.peak_bytes = max(window.peak_bytes, window.end_bytes)


def _rss() -> int:
    """Resident set size of this process (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def machine(device: torch.device) -> dict[str, object]:
    """Where and with what the numbers were taken."""
    import transformers

    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_name(),
        # the vector instructions torch (and operators/native) use: CPU results differ by them
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        # how the CPU's C kernels were called: "C++" operators, "Python" (ctypes; the
        # KTINJECT_NATIVE=ctypes A/B build or no C++ compiler), or None (not built or not used)
        "native_operators": native_ops.kernels,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def free_memory(device: torch.device) -> None:
    """Drop what dead objects and compiled graphs still hold, before the next big allocation."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
