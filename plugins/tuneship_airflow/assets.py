"""The Assets that chain the four DAGs (names fixed by the architecture)."""

from __future__ import annotations

from airflow.sdk import Asset

validated_dataset = Asset(name="validated_dataset", uri="tuneship://datasets/validated")
retrain_request = Asset(name="retrain_request", uri="tuneship://monitor/retrain-request")
release_candidate = Asset(name="release_candidate", uri="tuneship://registry/release-candidate")
model_promoted = Asset(name="model_promoted", uri="tuneship://serving/model-promoted")
