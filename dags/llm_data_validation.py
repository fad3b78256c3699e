"""
### llm_data_validation

Validates and versions a batch of training data with Great Expectations before anything
may be fine-tuned on it. Nightly it picks up the newest batch in the incoming location; a
batch marked complete there (a `_SUCCESS` file written after the data) starts it at once
through the `incoming_training_data` Asset's watcher on the triggerer; trigger it from the
UI with `dataset_uri` for an ad-hoc batch. Accepted data gets a content-addressed version and
emits the `validated_dataset` Asset (extra: `version_id`, `manifest_uri`); rejected data fails
the run once (a decision: no retry) with a message naming the file, lines and checks, and
says so on Slack.
Validating content that is already versioned is a no-op: no new event, no retrain.
Runs one at a time (on a new deployment the latest nightly run starts when the DAG is
unpaused, beside any manual run): each compares with, and moves, the last accepted version.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from tuneship_airflow.assets import incoming_training_data, validated_dataset
from tuneship_airflow.refusals import fail_on_refusal


@dag(
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"), assets=incoming_training_data
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one validation at a time: each compares with, and moves, the last accepted version
    doc_md=__doc__,
    tags=["tuneship", "data"],
    default_args={"owner": "ml-platform", "retries": 1},
    params={
        "dataset_uri": Param(
            None,
            type=["null", "string"],
            title="Dataset URI",
            description="Directory (local path or object-storage URI) with train.jsonl and eval.jsonl. "
            "Empty: the incoming location.",
        ),
    },
)
def llm_data_validation():
    @task(outlets=[validated_dataset])
    @fail_on_refusal
    def validate_and_version(params=None, run_id=None, outlet_events=None, triggering_asset_events=None):
        from airflow.sdk.exceptions import AirflowSkipException

        from tuneship.stages import batches_to_validate, validate_batches

        uris = batches_to_validate(params["dataset_uri"], triggering_asset_events)
        if not uris:
            raise AirflowSkipException("nothing has landed in the incoming location")
        result = validate_batches(uris, run_id=run_id)
        if result is None:
            raise AirflowSkipException(f"{', '.join(uris)}: content already versioned, nothing new")
        outlet_events[validated_dataset].extra = {
            "version_id": result["version_id"],
            "manifest_uri": result["manifest_uri"],
            "path": result["path"],
        }
        return result

    validate_and_version()


llm_data_validation()
