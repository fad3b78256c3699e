"""Approval before the switch through Airflow's REAL human-in-the-loop API (issue 15): the
release's `ReleaseApprovalOperator` in a test DAG (`tests/fixtures/dags/approval_release.py`:
the approval step between a window verdict and the decision, without serving around it),
run by the real scheduler, answered with `PATCH .../hitlDetails` as the UI's Required
Actions page does.

* a candidate whose hyperparameters differ from the champion's waits in `awaiting_input`;
  the request names the change with both values, the figures and the links;
* Approve promotes, saying who approved and their comment; Reject rolls back, saying who;
* no answer within the task's timeout (`approval.on_timeout: rollback`) rolls back: Airflow's
  scheduler applies the declared default;
* a candidate with the champion's lineage is not held at all.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envs import override_env
from ports import free_port

from tuneship import config

pytestmark = pytest.mark.integration

AIRFLOW = ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor"]
DAG = "approval_release"


def wait(check: Callable[[], Any], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def task_file(tasks: Path, name: str, approval: dict) -> None:
    """triage's task file under another name, with an approval section (its module beside it)."""
    spec = yaml.safe_load((config.REPO_ROOT / "include" / "tasks" / "triage.yaml").read_text())
    spec.update(name=name, served_model=name, registered_model=f"tuneship-{name}", approval=approval)
    spec.pop("demo", None)
    (tasks / f"{name}.yaml").write_text(yaml.safe_dump(spec))


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


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    from tuneship import registry, services
    from tuneship.airflow_api import AirflowAPI

    home = tmp_path_factory.mktemp("approval-airflow")
    tasks = home / "tasks"
    tasks.mkdir()
    shutil.copy(config.REPO_ROOT / "include" / "tasks" / "triage_task.py", tasks / "gated_task.py")
    for name, approval in (("gated", {"when": ["changed"], "timeout_hours": 1}),
                           ("gated_quick", {"when": ["always"], "timeout_hours": 0.003, "on_timeout": "rollback"})):
        task_file(tasks, name, approval)
        text = (tasks / f"{name}.yaml").read_text().replace("triage_task:", "gated_task:")
        (tasks / f"{name}.yaml").write_text(text)
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
            yield api, home
        finally:
            services.stop(AIRFLOW)


PROMOTE = {"verdict": "promote", "requests": 412, "error_rate": 0.0, "p95_ms": 480.0, "agreement_with_live": 0.91,
           "reasons": ["every bound on the good side"]}


def release(api: Any, task: str, v: str, verdict: dict = PROMOTE) -> str:
    plan = {"task": task, "version": v, "colour": "green", "previous_version": "1", "previous_colour": "blue"}
    return api.trigger(DAG, {"plan": plan, "verdict": verdict})


def state(api: Any, run_id: str, task_id: str) -> str | None:
    return next((t["state"] for t in api.task_instances(DAG, run_id) if t["task_id"] == task_id), None)


def hitl(api: Any, run_id: str) -> str:
    return f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails"


def finished(api: Any, run_id: str) -> dict:
    run = wait(lambda: (r := api.run(DAG, run_id))["state"] in ("success", "failed") and r, f"run {run_id}", 180)
    failed = [t["task_id"] for t in api.task_instances(DAG, run_id) if t["state"] == "failed"]
    assert run["state"] == "success", {t: api.task_log(DAG, run_id, t)[-3000:] for t in failed}
    return api.xcom(DAG, run_id, "decide")


@pytest.mark.parametrize(("answer", "comment", "verdict", "said"), [
    ("Approve", "lr sweep reviewed", "promote", "approved by admin: 'lr sweep reviewed'"),
    ("Reject", "", "rollback", "refused by admin")])
def test_a_changed_candidate_waits_for_a_person_who_decides(airflow: tuple[Any, Path], answer: str, comment: str,
                                                            verdict: str, said: str):
    api, home = airflow
    v = version("gated", f"candidate-{answer}", recipe_hash="h2", lora_r="16", home=home)
    run_id = release(api, "gated", v)
    wait(lambda: state(api, run_id, "approval") == "awaiting_input", "the approval to wait for a person", 180)
    detail = api.request("GET", hitl(api, run_id))
    assert detail["subject"] == f"Release gated v{v}?" and detail["options"] == ["Approve", "Reject"]
    body = detail["body"]
    assert 'hyperparameters changed against the champion: {"lora_r": "8"} -> {"lora_r": "16"}' in body
    assert "p95 454 ms" in body and "412 requests" in body and "agreement with live 91%" in body
    assert f"/tuneship/reports/model-card-gated-v{v}.html" in body and f"/dags/{DAG}/runs/" in body
    assert state(api, run_id, "decide") in (None, "none")  # nothing decided while a person is asked

    # A person reads first. (An answer within about a second of the request races Airflow 3.3's
    # LocalExecutor: the parked process's late "success" report fails the resumed task.)
    time.sleep(5)
    api.request("PATCH", hitl(api, run_id), json={"chosen_options": [answer], "params_input": {"comment": comment}})
    decided = finished(api, run_id)
    assert decided["verdict"] == verdict and said in decided["reasons"][-1]
    answered = api.xcom(DAG, run_id, "approval")
    assert (answered["asked"], answered["approved"], answered["by"], answered["timed_out"]) == \
        (True, answer == "Approve", "admin", False)
    # answered once: a second answer is refused by Airflow
    with pytest.raises(Exception, match="409"):
        api.request("PATCH", hitl(api, run_id), json={"chosen_options": ["Approve"]})


def test_no_answer_within_the_timeout_rolls_back(airflow: tuple[Any, Path]):
    api, home = airflow
    v = version("gated_quick", "quick-candidate", recipe_hash="h1", lora_r="8", home=home)
    run_id = release(api, "gated_quick", v)
    decided = finished(api, run_id)  # nobody answers: the scheduler applies the declared default
    assert decided["verdict"] == "rollback"
    assert decided["reasons"] == ["no answer within the approval timeout (0.003 h)"]
    answered = api.xcom(DAG, run_id, "approval")
    assert answered["asked"] and answered["timed_out"] and answered["by"] is None and not answered["approved"]


def test_a_candidate_with_the_champions_lineage_is_not_held(airflow: tuple[Any, Path]):
    api, home = airflow
    v = version("gated", "same-lineage", recipe_hash="h1", lora_r="8", home=home)
    run_id = release(api, "gated", v)
    decided = finished(api, run_id)
    assert decided["verdict"] == "promote" and "approval" not in decided
    assert api.xcom(DAG, run_id, "approval") == {"asked": False, "reasons": [], "approved": None}
