"""The Assets that chain the four DAGs (names fixed by the architecture)."""

from __future__ import annotations

from airflow.sdk import Asset

validated_dataset = Asset(name="validated_dataset", uri="tuneship://datasets/validated")
retrain_request = Asset(name="retrain_request", uri="tuneship://monitor/retrain-request")
release_candidate = Asset(name="release_candidate", uri="tuneship://registry/release-candidate")
model_promoted = Asset(name="model_promoted", uri="tuneship://serving/model-promoted")


def latest_event_extra(context, asset: Asset) -> dict | None:
    """Extra of the newest triggering event for `asset` in this run, if any."""
    events = context.get("triggering_asset_events") or {}
    for key, evs in events.items():
        name = getattr(key, "name", None) or str(key)
        if name == asset.name or getattr(key, "uri", None) == asset.uri:
            if evs:
                return dict(evs[-1].extra or {})
    return None
