"""Per-served-model routing state on disk (serving.gateway.routing.RouteRegistry), and the
inference-log reader's per-model partitions: no sockets needed for either."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `serving` lives at the repo root
    sys.path.insert(0, str(REPO))

from serving.gateway import routing  # noqa: E402
from serving.gateway.routing import Route, RouteRegistry  # noqa: E402
from tuneship.inference_log import partition_file, read_inference_log, served_models  # noqa: E402

BLUE = Route(colour="blue", model="triage_blue", version="1")
GREEN = Route(colour="green", model="triage_green", version="2")


def set_routes(live: Route | None, shadow: Route | None = None):
    return lambda s: s.model_copy(update={"live": live, "shadow": shadow})


def test_each_model_has_its_own_file_and_generation(tmp_path: Path):
    reg = RouteRegistry(tmp_path / "routes", writer_id="a")
    assert reg.names() == [] and reg.get("triage") is None
    assert reg.current("triage").generation == 0  # no file yet: the empty state
    reg.update("triage", set_routes(BLUE, GREEN))
    reg.update("faq", set_routes(Route(colour="blue", model="faq_blue")))
    faq_before = (tmp_path / "routes" / "faq.json").read_bytes()
    new = reg.update("triage", routing.switch)
    assert new.live == GREEN and new.previous == BLUE and new.generation == 2
    assert (tmp_path / "routes" / "faq.json").read_bytes() == faq_before
    assert reg.current("faq").generation == 1
    assert reg.names() == ["faq", "triage"]
    on_disk = json.loads((tmp_path / "routes" / "triage.json").read_text())
    assert on_disk["served_model"] == "triage" and on_disk["generation"] == 2


def test_a_replica_sees_a_model_another_replica_created(tmp_path: Path):
    a = RouteRegistry(tmp_path / "routes", writer_id="a")
    b = RouteRegistry(tmp_path / "routes", writer_id="b")
    assert b.get("faq") is None
    a.update("faq", set_routes(BLUE))
    store = b.get("faq")  # found on the next look, without a restart
    assert store is not None and store.current().live == BLUE
    assert b.names() == ["faq"]
    (tmp_path / "routes" / "faq.json").unlink()  # removed by hand: gone from the listing
    assert b.names() == []


def test_invalid_names_are_refused(tmp_path: Path):
    reg = RouteRegistry(tmp_path / "routes")
    for bad in ("Triage", "../etc", "", "a" * 65, "9lives"):
        with pytest.raises(ValueError, match="valid served-model name"):
            reg.update(bad, set_routes(BLUE))
        assert reg.get(bad) is None
    assert list((tmp_path / "routes").iterdir()) == []


def test_legacy_routes_file_is_migrated_once(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    legacy = tmp_path / "routes.json"
    legacy.write_text(json.dumps({"generation": 7, "served_model": "tuneship",
                                  "live": BLUE.model_dump(), "previous": None, "shadow": None}))
    with caplog.at_level("WARNING"):
        reg = RouteRegistry(tmp_path / "routes", legacy_path=legacy)
    assert "migrated the legacy routes file" in caplog.text
    state = reg.current("tuneship")
    assert state.live == BLUE and state.generation == 7  # the generation carries on
    assert not legacy.exists() and (tmp_path / "routes.json.migrated").exists()
    # A second start finds nothing to migrate and changes nothing.
    assert RouteRegistry(tmp_path / "routes", legacy_path=legacy).current("tuneship").generation == 7


def test_legacy_migration_refuses_rather_than_guess(tmp_path: Path):
    legacy = tmp_path / "routes.json"
    legacy.write_text(json.dumps({"served_model": "Triage LLM", "live": None}))
    with pytest.raises(ValueError, match=r"routes\.json.*served_model"):
        RouteRegistry(tmp_path / "routes", legacy_path=legacy)
    legacy.write_text(json.dumps({"served_model": "triage", "live": None}))
    RouteRegistry(tmp_path / "routes").update("triage", set_routes(BLUE))
    with pytest.raises(ValueError, match="already exists"):
        RouteRegistry(tmp_path / "routes", legacy_path=legacy)
    assert legacy.exists()  # left for a person to decide


def test_reader_reads_one_models_partition_or_all(tmp_path: Path):
    ts = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    for model in ("triage", "faq", None):  # None: a log written before per-model partitions
        path = partition_file(tmp_path, ts, "r1", model)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": "request", "ts": ts.isoformat(), "request_id": f"id-{model}",
                                    "served_model": model, "live": {"status": 200}}) + "\n")
    assert served_models(tmp_path) == ["faq", "triage"]
    assert [r["request_id"] for r in read_inference_log(tmp_path, model="faq")] == ["id-faq"]
    assert [r["request_id"] for r in read_inference_log(tmp_path, model="triage")] == ["id-triage"]
    assert sorted(r["request_id"] for r in read_inference_log(tmp_path)) == ["id-None", "id-faq", "id-triage"]
    assert read_inference_log(tmp_path, model="nobody") == []
    with pytest.raises(ValueError, match="served-model name"):
        read_inference_log(tmp_path, model="../x")
