"""System metrics of a training run: CPU, memory and (when present) GPU, sampled on a thread.

Why not MLflow's own system-metrics monitor: the MLflow run is created when the result is
registered (`tuneship.stages.register_training`), not inside the trainer, so the same trainer
runs unchanged in a pod that may not reach MLflow, and a retried task reuses one run. The
trainer therefore samples here and keeps the samples in `metrics.json` (`system`, one entry
per sample with the optimizer step and a timestamp); `tuneship.registry.log_training` logs
them as `system/<name>` metrics, the names MLflow's monitor uses, so they show in the run's
System metrics tab with the training step on the x axis.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

#: Seconds between samples; TUNESHIP_SYSTEM_METRICS_INTERVAL overrides it.
DEFAULT_INTERVAL_S = 10.0
_MB = 1024**2


def sample(step: int) -> dict[str, Any]:
    """One sample: system CPU %, system and process memory, and per-GPU memory/utilisation."""
    import psutil

    vm = psutil.virtual_memory()
    out: dict[str, Any] = {
        "step": int(step),
        "timestamp": int(time.time() * 1000),
        # system-wide, since the previous call (the sampler primes it at start)
        "cpu_utilization_percentage": psutil.cpu_percent(interval=None),
        "system_memory_usage_megabytes": round((vm.total - vm.available) / _MB, 1),
        "system_memory_usage_percentage": vm.percent,
        "process_rss_megabytes": round(psutil.Process().memory_info().rss / _MB, 1),
    }
    out.update(_gpu_sample())
    return out


def _gpu_sample() -> dict[str, float]:
    import sys

    torch = sys.modules.get("torch")  # never import torch just to find there is no GPU
    if torch is None or not torch.cuda.is_available():
        return {}
    out: dict[str, float] = {}
    for i in range(torch.cuda.device_count()):
        out[f"gpu_{i}_memory_usage_megabytes"] = round(torch.cuda.memory_reserved(i) / _MB, 1)
        out[f"gpu_{i}_peak_memory_allocated_megabytes"] = round(torch.cuda.max_memory_allocated(i) / _MB, 1)
        try:  # device utilisation needs NVML (nvidia-ml-py); memory figures do not
            out[f"gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(i))
        except Exception:  # noqa: BLE001 - no NVML in this image: memory figures only
            pass
    return out


class SystemSampler:
    """Samples every `interval` seconds on a daemon thread, plus once at start and at stop.

    `step` is read at each sample (the training loop's current optimizer step). Samples from an
    earlier, interrupted attempt can be passed in `samples` so a resumed run keeps them.
    """

    def __init__(self, step: Callable[[], int], interval: float | None = None,
                 samples: list[dict[str, Any]] | None = None) -> None:
        env = os.environ.get("TUNESHIP_SYSTEM_METRICS_INTERVAL")
        self.interval = float(env) if env else (interval or DEFAULT_INTERVAL_S)
        self.samples: list[dict[str, Any]] = list(samples or [])
        self._step = step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _take(self) -> None:
        try:
            s = sample(self._step())
        except Exception:  # noqa: BLE001 - metrics must never fail a training run
            return
        with self._lock:
            self.samples.append(s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def start(self) -> SystemSampler:
        try:
            import psutil

            psutil.cpu_percent(interval=None)  # prime: the first reading covers "since now"
        except Exception:  # noqa: BLE001 - psutil missing: no samples, training goes on
            return self
        self._take()
        self._thread = threading.Thread(target=self._run, name="tuneship-sysmetrics", daemon=True)
        self._thread.start()
        return self

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.samples)

    def stop(self) -> list[dict[str, Any]]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            self._take()
        return self.snapshot()
