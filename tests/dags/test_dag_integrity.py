"""Every DAG imports cleanly, fast, with the fixed ids, owner, retries, tags and forms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_IDS = {"llm_data_validation", "llm_finetune", "llm_release", "llm_drift_monitor", "llm_batch_inference"}


@pytest.fixture(scope="module")
def dagbag():
    from tuneship.services import airflow_env

    env = airflow_env()
    for key, value in env.items():
        if key.startswith("AIRFLOW"):
            os.environ[key] = value
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}, dagbag.import_errors


def test_dag_ids_are_fixed(dagbag):
    assert set(dagbag.dag_ids) == DAG_IDS
    for dag_id in DAG_IDS:
        assert Path(dagbag.dags[dag_id].fileloc).stem == dag_id


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_owner_retries_tags_doc(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert "tuneship" in dag.tags
    assert dag.doc_md and dag_id in dag.doc_md
    assert dag.catchup is False
    for t in dag.tasks:
        assert t.owner == "ml-platform", t.task_id
        assert t.retries >= 1, t.task_id


def test_finetune_form(dagbag):
    params = dagbag.dags["llm_finetune"].params
    for name in ("base_model", "lora_r", "lora_alpha", "epochs", "learning_rate", "runner"):
        assert name in params, name
        assert params.get_param(name).schema.get("type"), name
        assert params.get_param(name).description, name
        assert params.get_param(name).schema.get("title"), name
    assert params.get_param("runner").schema["enum"] == ["local", "docker", "kubernetes"]
    assert params["runner"] == "local"


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_form_defaults_are_valid_and_empty_means_default(dagbag, dag_id):
    """The UI form marks a Param required unless its type allows null; a Param whose
    description promises "Empty: ..." must therefore be nullable, and default to None so the
    form can be submitted untouched. Every default must pass its own schema."""
    import jsonschema

    params = dagbag.dags[dag_id].params
    params.validate()
    for name in params:
        param = params.get_param(name)
        jsonschema.validate(param.value, param.schema)
        if "Empty:" in (param.description or ""):
            assert "null" in param.schema["type"], (dag_id, name)
            assert param.value is None, (dag_id, name)
            jsonschema.validate(None, param.schema)


def test_release_figures_come_from_the_task_unless_the_run_sets_them():
    from tuneship.stages import release_thresholds
    from tuneship.tasks import load_task

    task = load_task("triage")
    empty = {"shadow_hours": None, "max_error_rate": None, "max_p95_ms": None, "min_requests": None}
    assert release_thresholds(task, empty) == task.release.model_dump(exclude={"min_format_rate"})
    assert release_thresholds(task, {**empty, "max_p95_ms": 0.001})["max_p95_ms"] == 0.001


def test_validation_and_release_params(dagbag):
    assert "dataset_uri" in dagbag.dags["llm_data_validation"].params
    release = dagbag.dags["llm_release"].params
    assert release["shadow_hours"] is None  # empty: the task's release.shadow_hours (72 h by default)
    assert release["post_switch_minutes"] == 30.0 and release["post_switch_min_requests"] == 20
    assert release["retention_minutes"] == 120.0


def test_release_guards_the_switch_then_retires_the_previous_colour(dagbag):
    """decide (switch) -> post-switch watch on the triggerer -> guard -> deferrable retention -> retire."""
    import re

    dag = dagbag.dags["llm_release"]
    order = ["which_task", "take_release_slot", "reconcile", "plan", "load_candidate", "smoke", "serving_gate",
             "start_shadow",
             "shadow_window", "canary", "approval", "decide", "post_switch_window", "post_switch_guard", "retention_window",
             "retire_previous", "give_back_release_slot"]
    assert set(dag.task_ids) == {*order, "other_candidates", "fan_out"}
    for before, after in zip(order, order[1:], strict=False):
        assert after in dag.get_task(before).downstream_task_ids, (before, after)
    watch = dag.get_task("post_switch_window")
    assert type(watch).__name__ == "PostSwitchWindowOperator" and "thresholds" in watch.template_fields
    assert type(dag.get_task("retention_window")).__name__ == "DateTimeSensorAsync"
    # every threshold template names a Param that exists, or the plan's figures (the task's
    # release section with the run's Params on top: tuneship.stages.release_thresholds)
    for key, value in watch.thresholds.items():
        names = re.findall(r"params\.(\w+)", value)
        assert names and names[0] in dag.params or f"['thresholds']['{key}']" in value, (watch.task_id, value)
    assert "post_switch_min_requests" in watch.thresholds["min_requests"]
    shadow = dag.get_task("shadow_window")  # the whole release section, the run's Params on top
    assert "['thresholds'] | tojson" in shadow.release and "start_shadow" in shadow.slot
    approval = dag.get_task("approval")  # Airflow's human-in-the-loop request, with a comment field
    assert type(approval).__name__ == "ReleaseApprovalOperator" and approval.options == ["Approve", "Reject"]
    assert "comment" in approval.params and "task_name" in approval.template_fields


def test_release_runs_tasks_side_by_side_one_per_task(dagbag):
    """Several release runs at once (different tasks), serialised per task by a slot taken in a
    setup task (deferrable wait) and given back in a teardown, which runs when the release fails."""
    dag = dagbag.dags["llm_release"]
    assert dag.max_active_runs > 1
    take, give = dag.get_task("take_release_slot"), dag.get_task("give_back_release_slot")
    assert take.is_setup and type(take).__name__ == "ReleaseSlotOperator" and "task" in take.template_fields
    assert give.is_teardown and give.trigger_rule == "all_done_setup_success"
    assert take.task_id in give.upstream_task_ids
    # everything that touches serving runs between taking and giving back the slot
    for t in dag.tasks:
        if t.task_id not in ("which_task", "other_candidates", "fan_out", take.task_id, give.task_id):
            assert take.task_id in t.get_flat_relative_ids(upstream=True), t.task_id
            assert give.task_id in t.get_flat_relative_ids(upstream=False), t.task_id


def test_finetune_fans_out_the_other_tasks_events(dagbag):
    """which_task -> fan_out (one llm_finetune run per other task, mapped) beside plan, so a
    plan that fails for this run's task never stops the other tasks' runs."""
    dag = dagbag.dags["llm_finetune"]
    assert dag.max_active_runs == 1
    fan_out = dag.get_task("fan_out")
    assert type(fan_out).__name__ == "MappedOperator" and fan_out.operator_name == "TriggerDagRunOperator"
    assert fan_out.partial_kwargs["trigger_dag_id"] == "llm_finetune"
    assert fan_out.partial_kwargs["skip_when_already_exists"] is True
    assert dag.get_task("other_tasks").upstream_task_ids == {"which_task"}
    assert fan_out.upstream_task_ids == {"other_tasks"}
    assert dag.get_task("plan").upstream_task_ids == {"which_task"}
    assert "dataset_version" in dag.params
    # which_task reads both assets' recent events for the ones Airflow 3.3 gave no run (#56050)
    assert {a.name for a in dag.get_task("which_task").inlets} == {"validated_dataset", "retrain_request"}


def test_release_fans_out_other_tasks_candidates_without_their_slot(dagbag):
    """Candidates of other tasks in one release run get their own llm_release runs, started
    before this run takes its slot (so another task's release never waits on this one)."""
    dag = dagbag.dags["llm_release"]
    fan_out = dag.get_task("fan_out")
    assert type(fan_out).__name__ == "MappedOperator" and fan_out.operator_name == "TriggerDagRunOperator"
    assert fan_out.partial_kwargs["trigger_dag_id"] == "llm_release"
    assert fan_out.partial_kwargs["skip_when_already_exists"] is True
    assert dag.get_task("other_candidates").upstream_task_ids == {"which_task"}
    assert "take_release_slot" not in fan_out.get_flat_relative_ids(upstream=True)
    assert {a.name for a in dag.get_task("which_task").inlets} == {"release_candidate"}
    assert {a.name for a in dagbag.dags["llm_data_validation"].get_task("find_batches").inlets} == \
        {"incoming_training_data"}


def test_every_dag_takes_the_task_as_a_param_listing_the_task_files(dagbag):
    """The trigger form's Task dropdown lists include/tasks/*.yaml; empty means "from the event"."""
    from tuneship.tasks import task_names

    assert "triage" in task_names()
    for dag_id in ("llm_data_validation", "llm_finetune", "llm_release"):
        schema = dagbag.dags[dag_id].params.get_param("task").schema
        assert schema["enum"] == [None, *task_names()], dag_id
        assert dagbag.dags[dag_id].params["task"] is None


def test_asset_chain(dagbag):
    def names(dag):
        cond = dag.timetable.asset_condition
        return {a.name for a in getattr(cond, "objects", [cond])}

    outlets = {dag_id: {o.name for t in dagbag.dags[dag_id].tasks for o in t.outlets} for dag_id in DAG_IDS}
    assert outlets["llm_data_validation"] == {"validated_dataset"}
    assert outlets["llm_finetune"] == {"release_candidate"}
    assert outlets["llm_release"] == {"model_promoted"}
    assert outlets["llm_drift_monitor"] == {"retrain_request"}
    assert outlets["llm_batch_inference"] == set()
    assert names(dagbag.dags["llm_finetune"]) == {"validated_dataset", "retrain_request"}
    assert names(dagbag.dags["llm_release"]) == {"release_candidate"}


def test_finetune_has_three_runners(dagbag):
    dag = dagbag.dags["llm_finetune"]
    kinds = {t.task_id: type(t).__name__ for t in dag.tasks}
    assert kinds["train_local"] == "LocalTrainerOperator"
    assert kinds["train_docker"] == "DockerTrainerOperator"
    assert kinds["train_kubernetes"] == "KubernetesTrainerOperator"
    task = dag.get_task("train_kubernetes")
    task.arguments = ["python", "-m", "tuneship.train", "--recipe", "r.yaml"]
    kpo = task.build()
    assert type(kpo).__name__ == "KubernetesPodOperator"
    assert kpo.deferrable and kpo.reattach_on_restart and kpo.pod_template_dict
    assert kpo.on_finish_action.value == "delete_pod"
    assert kpo.execution_timeout == task.execution_timeout
    # the whole argv is the base container's command; nothing is appended as args
    base = next(c for c in kpo.pod_template_dict["spec"]["containers"] if c["name"] == "base")
    assert base["command"] == task.arguments and not kpo.arguments
    # the deferral re-entry point exists on the wrapper, so a resumed task finds it
    assert callable(getattr(task, kpo.trigger_reentry.__name__))
    docker_task = dag.get_task("train_docker")
    docker_task.arguments = task.arguments
    dop = docker_task.build()
    assert dop.device_requests[0]["Capabilities"] == [["gpu"]]
    assert dop.command == task.arguments


HEAVY = ("torch", "transformers", "peft", "mlflow", "pandas", "great_expectations", "tritonclient",
         "onnxruntime", "onnx", "pyarrow", "matplotlib")


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_dag_file_parse_imports_nothing_heavy(dag_id):
    """Parse-time cost, checked deterministically: parsing a DAG file in a fresh interpreter
    (Airflow SDK already imported) pulls in none of the heavy libraries, directly or through
    the plugins and `tuneship` modules it imports. Timing belongs to `make bench`."""
    from tuneship.services import airflow_env

    code = (
        "import runpy, sys, airflow.sdk; sys.path.insert(0, 'plugins'); before = set(sys.modules);"
        f"runpy.run_path('dags/{dag_id}.py'); print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=airflow_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    new = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed list
    heavy = sorted(m for m in new if m.split(".")[0] in HEAVY)
    assert not heavy, f"parsing {dag_id} imports {heavy[:10]}"


def test_no_heavy_imports_at_module_level():
    heavy = HEAVY
    for path in (REPO / "dags").glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("import ", "from ")):
                assert not any(line.split()[1].split(".")[0] == h for h in heavy), f"{path.name}: {line}"


def test_ruff_air3_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "AIR3", "dags", "plugins"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_validation_runs_nightly_and_when_a_batch_lands(dagbag):
    """Cron at 02:00 UTC OR the incoming-data Asset, whose watcher runs IncomingBatchTrigger
    (an event trigger, serialisable for the triggerer) on each task's landing location."""
    from airflow.triggers.base import BaseEventTrigger

    from tuneship import config
    from tuneship.tasks import load_tasks

    # On unpause the latest nightly run starts beside any manual one: they must queue, not race.
    assert dagbag.dags["llm_data_validation"].max_active_runs == 1
    tt = dagbag.dags["llm_data_validation"].timetable
    assert (tt.timetable.expression, str(tt.timetable.timezone)) == ("0 2 * * *", "UTC")
    cond = tt.asset_condition
    assets = list(getattr(cond, "objects", [cond]))
    assert [a.name for a in assets] == ["incoming_training_data"]
    (watcher,) = assets[0].watchers
    assert isinstance(watcher.trigger, BaseEventTrigger)
    path, kwargs = watcher.trigger.serialize()
    assert path == "tuneship_airflow.triggers.IncomingBatchTrigger"
    assert kwargs["marker"] == "_SUCCESS"
    assert kwargs["directories"] == {n: str(t.landing()) for n, t in load_tasks().items()}
    assert kwargs["directories"]["triage"] == str(config.incoming() / "triage")


# The tasks whose stage can refuse (a gate's decision): each must fail once, without a retry.
DECIDING_TASKS = {("llm_data_validation", "validate_and_version"), ("llm_finetune", "plan"),
                  ("llm_finetune", "evaluate"), ("llm_finetune", "compile_model"), ("llm_release", "smoke"),
                  ("llm_release", "serving_gate"),
                  ("llm_release", "decide"),
                  ("llm_release", "post_switch_guard"),
                  ("llm_batch_inference", "plan"), ("llm_batch_inference", "answer_chunk")}


def test_deciding_tasks_fail_on_refusal_and_others_keep_their_retries(dagbag):
    for dag_id in DAG_IDS:
        for t in dagbag.dags[dag_id].tasks:
            wrapped = getattr(getattr(t, "python_callable", None), "fails_on_refusal", False)
            assert wrapped == ((dag_id, t.task_id) in DECIDING_TASKS), (dag_id, t.task_id)


def test_clock_schedules_off_leaves_only_the_asset_triggers(dagbag, monkeypatch):
    """`make demo`'s stack (TUNESHIP_CLOCK_SCHEDULES=off): no cron creates a run, every asset
    trigger stays; the default stack keeps its clocks; a value that is neither on nor off
    fails the parse naming the variable."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.timetables.assets import AssetTriggeredTimetable
    from airflow.sdk.definitions.timetables.simple import NullTimetable

    assert dagbag.dags["llm_drift_monitor"].timetable.expression == "0 * * * *"
    assert dagbag.dags["llm_batch_inference"].timetable.expression == "0 2 * * *"
    monkeypatch.setenv("TUNESHIP_CLOCK_SCHEDULES", "off")
    off = DagBag(dag_folder=str(REPO / "dags"))
    assert off.import_errors == {}
    for dag_id in ("llm_drift_monitor", "llm_batch_inference"):
        assert isinstance(off.dags[dag_id].timetable, NullTimetable), dag_id
    validation = off.dags["llm_data_validation"].timetable
    assert type(validation) is AssetTriggeredTimetable  # not its AssetOrTimeSchedule subclass
    assert validation.asset_condition.name == "incoming_training_data"
    for dag_id in ("llm_finetune", "llm_release"):  # asset-triggered either way
        assert off.dags[dag_id].timetable.asset_condition == dagbag.dags[dag_id].timetable.asset_condition
    monkeypatch.setenv("TUNESHIP_CLOCK_SCHEDULES", "sometimes")
    bad = DagBag(dag_folder=str(REPO / "dags"))
    assert bad.import_errors and all("TUNESHIP_CLOCK_SCHEDULES" in e for e in bad.import_errors.values())
