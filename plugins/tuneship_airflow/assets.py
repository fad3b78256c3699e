"""The Assets that chain the four DAGs (names fixed by the architecture)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetWatcher

from tuneship.tasks import load_tasks
from tuneship_airflow.triggers import IncomingBatchTrigger

validated_dataset = Asset(name="validated_dataset", uri="tuneship://datasets/validated")
retrain_request = Asset(name="retrain_request", uri="tuneship://monitor/retrain-request")
release_candidate = Asset(name="release_candidate", uri="tuneship://registry/release-candidate")
model_promoted = Asset(name="model_promoted", uri="tuneship://serving/model-promoted")

# Event-driven: the triggerer watches each task's landing location; a batch marked complete
# (`_SUCCESS`) updates this Asset (payload: task, dataset_uri), which starts
# llm_data_validation without waiting for the night. The task files and TUNESHIP_INCOMING
# are read at parse time (the triggerer and the workers share them); a broken task file
# fails the parse here, naming the file and the key.
incoming_training_data = Asset(
    name="incoming_training_data",
    uri="tuneship://datasets/incoming",
    watchers=[
        AssetWatcher(
            name="incoming_batch_watcher",
            trigger=IncomingBatchTrigger(
                directories={name: str(task.landing()) for name, task in load_tasks().items()},
                poke_interval=float(os.environ.get("TUNESHIP_INCOMING_POKE_SECONDS", "30")),
            ),
        )
    ],
)


def recent_events(dag_run: Any, inlet_events: Any, *assets: Asset) -> dict[Asset, list] | None:
    """An asset-triggered run's view of `assets`' events since its `run_after` (less
    `STRAY_MARGIN_S`, newest 100 each), where `tuneship.event_claims` finds the events Airflow
    3.3 gave no run (apache/airflow#56050). None for any other run: only the scheduler's
    creation of an asset-triggered run strands events. The calling task lists `assets` as
    its inlets (the Task SDK reads only an inlet's events)."""
    from tuneship.event_claims import STRAY_MARGIN_S

    if dag_run.run_type != "asset_triggered":
        return None
    since = (dag_run.run_after - timedelta(seconds=STRAY_MARGIN_S)).isoformat()
    return {a: list(inlet_events[a].after(since).ascending(False).limit(100)) for a in assets}


def skip_if_handled(chosen: dict[str, Any], nothing: str) -> None:
    """Say in the task log which events another run already handled and which strays this run
    took; skip the run (`nothing`: why) when every event it was given was handled elsewhere."""
    from airflow.sdk.exceptions import AirflowSkipException

    for key, other in chosen.get("already_handled", {}).items():
        print(f"event {key} was already handled by run {other}: left to it")
    if chosen.get("strays"):
        print(f"taking events that no run consumed (apache/airflow#56050): {chosen['strays']}")
    if chosen["task"] is None:
        raise AirflowSkipException(nothing)
