"""The Assets that chain the four DAGs (names fixed by the architecture)."""

from __future__ import annotations

import os

from airflow.sdk import Asset, AssetWatcher

from tuneship import config
from tuneship_airflow.triggers import IncomingBatchTrigger

validated_dataset = Asset(name="validated_dataset", uri="tuneship://datasets/validated")
retrain_request = Asset(name="retrain_request", uri="tuneship://monitor/retrain-request")
release_candidate = Asset(name="release_candidate", uri="tuneship://registry/release-candidate")
model_promoted = Asset(name="model_promoted", uri="tuneship://serving/model-promoted")

# Event-driven: the triggerer watches the incoming location; a batch marked complete
# (`_SUCCESS`) updates this Asset, which starts llm_data_validation without waiting for the
# night. TUNESHIP_INCOMING is read at parse time (the triggerer and the workers share it).
incoming_training_data = Asset(
    name="incoming_training_data",
    uri="tuneship://datasets/incoming",
    watchers=[
        AssetWatcher(
            name="incoming_batch_watcher",
            trigger=IncomingBatchTrigger(
                directory=str(config.incoming()),
                poke_interval=float(os.environ.get("TUNESHIP_INCOMING_POKE_SECONDS", "30")),
            ),
        )
    ],
)
