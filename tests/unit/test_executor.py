"""The embedded default's executor: LocalExecutor workers that inherit the ML libraries."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_preload_imports_each_module_and_reports_one_that_fails():
    from tuneship_airflow.executor import preload

    done = preload(("json", "tuneship_no_such_module"))
    assert done["json"] == "ok" and "json" in sys.modules
    assert done["tuneship_no_such_module"].startswith("ModuleNotFoundError")


def test_the_embedded_default_runs_it_and_it_preloads_before_forking_workers(monkeypatch):
    from airflow.executors.local_executor import LocalExecutor

    from tuneship.services import airflow_env
    from tuneship_airflow import executor

    module, _, name = airflow_env()["AIRFLOW__CORE__EXECUTOR"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert cls is executor.PreloadingLocalExecutor and issubclass(cls, LocalExecutor)
    order = []
    monkeypatch.setattr(executor, "preload", lambda: order.append("preload"))
    monkeypatch.setattr(LocalExecutor, "start", lambda self: order.append("fork workers"))
    ex = cls(parallelism=1)
    ex.is_mp_using_fork = True
    ex.start()
    assert order == ["preload", "fork workers"]
    order.clear()
    ex.is_mp_using_fork = False  # spawned workers start from nothing: no point importing here
    ex.start()
    assert order == ["fork workers"]


def test_a_process_forked_after_the_preload_runs_torch_on_two_threads_and_a_model():
    """The claim the executor rests on: importing the libraries starts no OpenMP pool, so a
    task forked afterwards computes on several threads (libgomp's pool would not survive the
    fork). Several children, each a fresh fork of the preloaded parent, like the tasks."""
    code = textwrap.dedent("""
        import os, sys
        from tuneship_airflow.executor import PRELOAD, preload
        assert all(v == "ok" for v in preload(PRELOAD).values())
        for i in range(3):
            pid = os.fork()
            if pid == 0:
                import torch
                from transformers import LlamaConfig, LlamaForCausalLM
                torch.set_num_threads(2)
                a = torch.randn(256, 256)
                for _ in range(20):
                    a = torch.tanh(a @ a)
                cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2)
                out = LlamaForCausalLM(cfg).eval().generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4,
                                                            do_sample=False)
                os._exit(0 if out.shape == (1, 7) and torch.isfinite(a).all() else 3)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
        print("children ok")
    """)
    env = {"PYTHONPATH": f"{REPO / 'include'}:{REPO / 'plugins'}", "PATH": "/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "children ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
