"""The Assets that chain the four DAGs (names fixed by the architecture)."""

from __future__ import annotations

import os

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
