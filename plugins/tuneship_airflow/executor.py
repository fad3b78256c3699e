"""The embedded default's executor: Airflow's LocalExecutor, whose workers start with the
ML libraries already imported.

LocalExecutor forks its workers from the scheduler when it starts, and each worker forks a
process per task. Every task that loads a model (evaluate, compile, the drift check) or talks
to the registry would otherwise import torch, transformers, peft and MLflow itself: about 9 s
of CPU on 2 cores (`python -X importtime`), paid again by every such task of every run, most
of them on the loop's critical path. Importing them once in the scheduler, before the
workers are forked, lets every task process inherit them (copy-on-write; Airflow freezes the
GC before forking its workers for that reason).

Only third-party libraries are imported here, never Tuneship's own modules or the DAG files:
those are imported by each task as usual, so a changed task file or stage takes effect on the
next task without a restart. Importing runs no torch computation, so no OpenMP thread pool
exists in the scheduler to be lost across the fork (libgomp's pool does not survive one); the
forked tasks start their own. A library that fails to import is logged and left to the task
that needs it, which then fails naming it.

Configured by `tuneship.services.airflow_env` (`AIRFLOW__CORE__EXECUTOR`).
"""

from __future__ import annotations

import importlib
import logging
import time

from airflow.executors.local_executor import LocalExecutor

log = logging.getLogger(__name__)

# What task processes import to load and score a model or reach the registry. The Llama module
# is the demo models' (SmolLM2); another architecture's module is imported by its first task.
PRELOAD = ("torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "mlflow",
           "mlflow.tracking")


def preload(modules: tuple[str, ...] = PRELOAD) -> dict[str, str]:
    """Import `modules`; returns each one's outcome ("ok" or the error), logged with the time."""
    t0 = time.monotonic()
    done: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
            done[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - the task that needs it will fail naming it
            done[name] = f"{type(exc).__name__}: {exc}"
            log.warning("preloading %s failed (%s); tasks import it themselves", name, done[name])
    log.info("preloaded %s for the task processes in %.1fs", ", ".join(m for m, r in done.items() if r == "ok"),
             time.monotonic() - t0)
    return done


class PreloadingLocalExecutor(LocalExecutor):
    """LocalExecutor whose forked workers (and so every task process) inherit `PRELOAD`."""

    def start(self) -> None:
        if self.is_mp_using_fork:  # spawned workers would import everything again anyway
            preload()
        super().start()
