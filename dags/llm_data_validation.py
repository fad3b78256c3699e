"""
### llm_data_validation

Validates and versions a batch of a task's training data with Great Expectations and the
task's answer check before anything may be fine-tuned on it. Nightly it picks up the newest
batch in each task's landing location (`data.landing` in `include/tasks/<task>.yaml`); a
batch marked complete there (a `_SUCCESS` file written after the data) starts it at once
through the `incoming_training_data` Asset's watcher on the triggerer; trigger it from the
UI with a `task` and a `dataset_uri` for an ad-hoc batch. Accepted data gets a
content-addressed version and emits the `validated_dataset` Asset (extra: `task`,
`version_id`, `manifest_uri`); rejected data fails the run once (a decision: no retry) with
a message naming the file, lines and checks, and says so on Slack.
Validating content that is already versioned is a no-op: no new event, no retrain.
Runs one at a time (on a new deployment the latest nightly run starts when the DAG is
unpaused, beside any manual run): each compares with, and moves, the last accepted version.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from tuneship.tasks import task_names
from tuneship_airflow.assets import incoming_training_data, validated_dataset
from tuneship_airflow.refusals import fail_on_refusal
from tuneship_airflow.schedules import assets_or_clock


@dag(
    schedule=assets_or_clock("0 2 * * *", incoming_training_data),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one validation at a time: each compares with, and moves, the last accepted version
    doc_md=__doc__,
    tags=["tuneship", "data"],
    default_args={"owner": "ml-platform", "retries": 1},
    params={
        "task": Param(None, type=["null", "string"], enum=[None, *task_names()], title="Task",
                      description="The task the data is for (include/tasks/<task>.yaml). "
                      "Empty: every task's landing location."),
        "dataset_uri": Param(
            None,
            type=["null", "string"],
            title="Dataset URI",
            description="Directory (local path or object-storage URI) with train.jsonl and eval.jsonl; "
            "needs a task. Empty: the task's landing location.",
        ),
    },
)
def llm_data_validation():
    @task(inlets=[incoming_training_data])  # inlets: to read recent events (landings no run took)
    def find_batches(params=None, run_id=None, dag_run=None, triggering_asset_events=None, inlet_events=None):
        """(task, batch) pairs grouped by task: one validation per task, so each task's
        dataset version emits its own `validated_dataset` event."""
        from tuneship.stages import batches_to_validate
        from tuneship.tasks import load_task, load_tasks
        from tuneship_airflow.assets import recent_events

        tasks = [load_task(params["task"])] if params["task"] else list(load_tasks().values())
        work: dict[str, list[str]] = {}
        recent = recent_events(dag_run, inlet_events, incoming_training_data)
        for t, uri in batches_to_validate(tasks, params["dataset_uri"], triggering_asset_events,
                                          run_id=run_id, recent_events=recent):
            work.setdefault(t.name, []).append(uri)
        return [{"task": name, "uris": uris} for name, uris in work.items()]

    @task(outlets=[validated_dataset])
    @fail_on_refusal
    def validate_and_version(work: dict, run_id=None, outlet_events=None):
        from airflow.sdk.exceptions import AirflowSkipException

        from tuneship.stages import validate_batches
        from tuneship.tasks import load_task

        result = validate_batches(load_task(work["task"]), work["uris"], run_id=run_id)
        if result is None:
            raise AirflowSkipException(f"{', '.join(work['uris'])}: content already versioned, nothing new")
        outlet_events[validated_dataset].extra = {
            "task": work["task"],
            "version_id": result["version_id"],
            "manifest_uri": result["manifest_uri"],
            "path": result["path"],
        }
        return result

    validate_and_version.expand(work=find_batches())


llm_data_validation()
