"""Airflow with the approval test DAG (`tests/fixtures/dags/approval_release.py`: the
release's `ReleaseApprovalOperator` between a window verdict and the decision), two task
files that ask for approval, and an MLflow registry with a champion: shared by the REST
API test (tests/integration/test_approval.py) and the browser test
(tests/browser/test_approval_ui.py)."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from envs import override_env
from ports import free_port
from waiting import wait

from tuneship import config

AIRFLOW = ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor"]
DAG = "approval_release"
PROMOTE = {"verdict": "promote", "requests": 412, "error_rate": 0.0, "p95_ms": 480.0, "agreement_with_live": 0.91,
           "reasons": ["every bound on the good side"]}


def _task_file(tasks: Path, name: str, approval: dict) -> None:
    """triage's task file under another name, with an approval section (its module beside it)."""
    spec = yaml.safe_load((config.REPO_ROOT / "include" / "tasks" / "triage.yaml").read_text())
    spec.update(name=name, served_model=name, registered_model=f"tuneship-{name}", approval=approval)
    spec.pop("demo", None)
    (tasks / f"{name}.yaml").write_text(yaml.safe_dump(spec).replace("triage_task:", "gated_task:"))


def version(task: str, run_key: str, *, recipe_hash: str, lora_r: str, home: Path) -> str:
    """A registered version with the lineage `register_training` records."""
    from tuneship import registry

    manifest = home / "datasets" / run_key / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schema": "prompt_completion", "source_uri": f"/landing/{task}/batch-0001"}))
    run_id = registry.start_run(run_key, run_name=run_key)
    registry.client().log_param(run_id, "lora_r", lora_r)
    mv = registry.register(run_id, run_key, name=f"tuneship-{task}", tags={
        "base_model": "smollm2-135m-instruct", "recipe_hash": recipe_hash, "dataset_manifest": str(manifest),
        "gates": "passed", "serving": "passed", "serving_p95_ms": "454"})
    return mv.version


@contextlib.contextmanager
def approval_airflow(home: Path) -> Iterator[Any]:
    """Tasks `gated` (asks when the lineage changed; champion v1 with lora_r 8) and
    `gated_quick` (asks always, times out after 0.003 h and rolls back); Airflow's API
    server, scheduler and dag-processor on a free port; yields the REST client."""
    from tuneship import registry, services
    from tuneship.airflow_api import AirflowAPI

    tasks = home / "tasks"
    tasks.mkdir()
    shutil.copy(config.REPO_ROOT / "include" / "tasks" / "triage_task.py", tasks / "gated_task.py")
    _task_file(tasks, "gated", {"when": ["changed"], "timeout_hours": 1})
    _task_file(tasks, "gated_quick", {"when": ["always"], "timeout_hours": 0.003, "on_timeout": "rollback"})
    env = {"TUNESHIP_HOME": str(home), "TUNESHIP_PORT_AIRFLOW": str(free_port()),
           "TUNESHIP_DAGS_FOLDER": str(config.REPO_ROOT / "tests" / "fixtures" / "dags"),
           "TUNESHIP_TASK_PATH": str(tasks), "MLFLOW_TRACKING_URI": ""}
    with override_env(**env):
        try:
            champion = version("gated", "champion", recipe_hash="h1", lora_r="8", home=home)
            registry.set_alias("champion", champion, "tuneship-gated")
            services.start(AIRFLOW, timeout=240)
            api = AirflowAPI(f"http://127.0.0.1:{env['TUNESHIP_PORT_AIRFLOW']}", services.ADMIN_USER,
                             services.admin_password())
            wait(lambda: DAG in api.dags(pattern="approval") or api.import_errors(), f"{DAG} to be parsed", 240)
            assert not api.import_errors(), api.import_errors()
            api.unpause(DAG)
            yield api
        finally:
            services.stop(AIRFLOW)


def release(api: Any, task: str, v: str, verdict: dict = PROMOTE) -> str:
    plan = {"task": task, "version": v, "colour": "green", "previous_version": "1", "previous_colour": "blue"}
    return api.trigger(DAG, {"plan": plan, "verdict": verdict})


def state(api: Any, run_id: str, task_id: str) -> str | None:
    return next((t["state"] for t in api.task_instances(DAG, run_id) if t["task_id"] == task_id), None)


def finished(api: Any, run_id: str) -> dict:
    """The finished run's decision (`decide`'s XCom); a failed task's log in the assertion."""
    run = wait(lambda: (r := api.run(DAG, run_id))["state"] in ("success", "failed") and r, f"run {run_id}", 180)
    failed = [t["task_id"] for t in api.task_instances(DAG, run_id) if t["state"] == "failed"]
    assert run["state"] == "success", {t: api.task_log(DAG, run_id, t)[-3000:] for t in failed}
    return api.xcom(DAG, run_id, "decide")


def trail(home: Path, task: str, v: str) -> list[dict]:
    """The audit records of one release (the trail verified whole first)."""
    from tuneship import audit

    path = home / "audit" / "audit.jsonl"
    assert audit.verify(path).ok, audit.verify(path).summary()
    return [r for r in audit.read(task=task, path=path) if r.get("version") == str(v)]
