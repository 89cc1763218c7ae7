"""Monitor: sampled CPU RSS and GPU memory, peaks reset at trial start, phase timings.

A sampling thread reads the process RSS (psutil) and, on CUDA, ``torch.cuda.memory_allocated``
every ``interval`` seconds. Peaks of GPU memory come from torch's own counters
(``max_memory_allocated`` / ``max_memory_reserved``), reset when the monitor starts, so they are
exact; CPU peaks are the max of the samples and of ``ru_maxrss`` (the kernel's own high-water
mark for this process, exact but never reset, hence clean only in a fresh process per trial).
Means are taken over the training-loop window only (``mark_train(True/False)``).
"""

from __future__ import annotations

import platform
import resource
import sys
import threading
import time
from typing import Any

import psutil


class Monitor:
    def __init__(self, device: str = "cpu", interval: float = 0.05):
        self.device = device
        self.interval = interval
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_train = False
        self.peak_rss = 0
        self._train_rss: list[int] = []
        self._train_gpu: list[int] = []
        self.timings: dict[str, float] = {}

    # -- lifecycle
    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, name="lorasweep-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sample()

    def mark_train(self, active: bool) -> None:
        """Training-loop window: means are computed over it."""
        self._sample()
        self._in_train = active

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            rss = self._proc.memory_info().rss
        except psutil.Error:  # pragma: no cover - process is going away
            return
        self.peak_rss = max(self.peak_rss, rss)
        if self._in_train:
            self._train_rss.append(rss)
            gpu = self._gpu_allocated()
            if gpu is not None:
                self._train_gpu.append(gpu)

    def _gpu_allocated(self) -> int | None:
        if self.device == "cuda":
            import torch

            return int(torch.cuda.memory_allocated())
        if self.device == "mps":
            import torch

            return int(torch.mps.current_allocated_memory())
        return None

    # -- timing
    def timer(self, name: str) -> _Timer:
        """``with monitor.timer("train"): ...`` records wall seconds under ``name``."""
        return _Timer(self, name)

    # -- results
    def metrics(self) -> dict[str, float]:
        # ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        kernel_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        out: dict[str, float] = {
            "peak_cpu_rss_bytes": float(max(self.peak_rss, kernel_peak)),
            "sampled_peak_cpu_rss_bytes": float(self.peak_rss),
        }
        if self._train_rss:
            out["mean_cpu_rss_bytes"] = float(sum(self._train_rss) / len(self._train_rss))
        if self._train_gpu:
            out["mean_gpu_allocated_bytes"] = float(sum(self._train_gpu) / len(self._train_gpu))
        if self.device == "cuda":
            import torch

            out["peak_gpu_allocated_bytes"] = float(torch.cuda.max_memory_allocated())
            out["peak_gpu_reserved_bytes"] = float(torch.cuda.max_memory_reserved())
        elif self.device == "mps":
            import torch

            out["peak_gpu_allocated_bytes"] = float(torch.mps.driver_allocated_memory())
        for name, secs in self.timings.items():
            out[f"{name}_seconds"] = secs
        return out


class _Timer:
    def __init__(self, monitor: Monitor, name: str):
        self.monitor, self.name = monitor, name

    def __enter__(self) -> _Timer:
        if self.monitor.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.monitor.device == "cuda":
            import torch

            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.t0
        self.monitor.timings[self.name] = self.monitor.timings.get(self.name, 0.0) + elapsed


def environment(device: str) -> dict[str, Any]:
    """Device name and package versions, stored with every trial."""
    import peft
    import torch
    import transformers

    env: dict[str, Any] = {
        "device": device,
        "device_name": platform.processor() or platform.machine(),
        "cpu_count": psutil.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        env["cuda"] = torch.version.cuda
    elif device == "mps":
        env["device_name"] = "Apple MPS"
    from importlib.metadata import PackageNotFoundError, version

    for optional in ("bitsandbytes", "accelerate", "datasets"):
        try:  # the version without importing (bitsandbytes takes seconds to import)
            env[optional] = version(optional)
        except PackageNotFoundError:
            pass
    return env
