"""Several tasks side by side through Airflow's REAL scheduler, triggerer and workers (issue 11):

* two `validated_dataset` events for two tasks collapse into one `llm_finetune` run, and
  each task still gets its own fine-tune run (the fan-out);
* releases of two tasks overlap, while a second release of the same task waits, deferred,
  until the first gives its slot back (here: after the first failed); a slot left behind
  by a finished run is taken over; a release marked failed by hand still gives its slot back.

No model is needed: the events name dataset versions that do not exist, so each fine-tune's
`plan` refuses at once (after the fan-out), and no gateway listens on the releases' port, so
each release fails in `reconcile` (after taking its slot; retries 20 s apart keep it holding
the slot for that long). What is observed is what the scheduler did: runs, confs, task
instance states, start/end times, XComs and logs, all through the REST API.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from envs import override_env
from ports import free_port
from waiting import wait

pytestmark = pytest.mark.integration

# The scheduler is started by the tests (the fan-out test posts its events before it runs).
AIRFLOW = ["airflow-api-server", "airflow-dag-processor", "airflow-triggerer"]
SCHEDULER = "airflow-scheduler"
FINISHED = {"success", "failed"}


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Airflow for the module, in its own home, on free ports; the gateway and Triton
    ports are free ports nothing listens on."""
    from tuneship import services
    from tuneship.airflow_api import AirflowAPI

    home = tmp_path_factory.mktemp("multi-airflow")
    gateway_port = free_port()
    env = {"TUNESHIP_HOME": str(home), "TUNESHIP_PORT_AIRFLOW": str(free_port()),
           "TUNESHIP_PORT_GATEWAY": str(gateway_port), "TUNESHIP_GATEWAY_URL": f"http://127.0.0.1:{gateway_port}",
           "TUNESHIP_PORT_TRITON_HTTP": str(free_port()), "TUNESHIP_TRITON_URL": f"127.0.0.1:{free_port()}",
           "TUNESHIP_DEFAULT_TASK": "triage", "TUNESHIP_INCOMING_POKE_SECONDS": "3600"}
    with override_env(**env):
        try:
            services.start(AIRFLOW, timeout=240)
            api = AirflowAPI(f"http://127.0.0.1:{env['TUNESHIP_PORT_AIRFLOW']}", services.ADMIN_USER,
                             services.admin_password())
            wait(lambda: {"llm_finetune", "llm_release"} <= set(api.dags()) or api.import_errors(),
                 "llm_finetune and llm_release to be parsed", 240)
            assert not api.import_errors(), api.import_errors()
            for dag_id in ("llm_finetune", "llm_release"):
                api.unpause(dag_id)
            yield api
        finally:
            services.stop([SCHEDULER, *AIRFLOW])


def tis(api: Any, dag_id: str, run_id: str) -> dict[str, dict]:
    return {(t["task_id"] if t["map_index"] < 0 else f"{t['task_id']}[{t['map_index']}]"): t
            for t in api.task_instances(dag_id, run_id)}


def when(ti: dict, field: str) -> datetime:
    return datetime.fromisoformat(ti[field].replace("Z", "+00:00"))


def finished(api: Any, dag_id: str, run_ids: list[str]) -> dict[str, dict] | None:
    runs = {r: api.run(dag_id, r) for r in run_ids}
    return runs if all(r["state"] in FINISHED for r in runs.values()) else None


def test_collapsed_events_of_two_tasks_get_one_fine_tune_run_each(airflow):

    api = airflow
    # Stopped scheduler: both events wait in the queue and the next scheduler loop makes ONE
    # run of them, as it does for events that arrive while a fine-tune runs (max_active_runs=1).
    # Two assets here; two events of the SAME asset: the next test.
    post_queued(api, [("retrain_request", {"task": "faq"}),
                      ("validated_dataset", {"task": "triage", "version_id": "tri-missing-1"})])
    parent_id, consumed = new_asset_run(api, "llm_finetune", set())
    child_id = f"fan_out__faq__{parent_id}"
    assert sorted(consumed) == ["faq", "triage"]

    # The collapsed run trains the newest event's task on that event's dataset version (which
    # does not exist: plan refuses at once, without a retry) and fans the other task out.
    runs = wait(lambda: finished(api, "llm_finetune", [parent_id]), "the collapsed run to finish", 120)
    assert runs[parent_id]["state"] == "failed"
    first = tis(api, "llm_finetune", parent_id)
    assert first["fan_out[0]"]["state"] == "success" and "fan_out[1]" not in first
    chosen = api.xcom("llm_finetune", parent_id, "which_task")
    assert (chosen["task"], chosen["trigger"], chosen["dataset_version"]) == \
        ("triage", "validated_dataset", "tri-missing-1")
    assert (first["plan"]["state"], first["plan"]["try_number"]) == ("failed", 1), first["plan"]
    log = api.task_log("llm_finetune", parent_id, "plan")
    assert "task triage has no accepted dataset version 'tri-missing-1'" in log, log[-2000:]

    # faq's own run (queued behind the first: one fine-tune at a time) retrains faq.
    child = wait(lambda: next((r for r in api.runs("llm_finetune") if r["dag_run_id"] == child_id), None),
                 "faq's fanned-out run", 60)
    assert child["conf"] == {"task": "faq", "trigger": "retrain_request"}
    plan = wait(lambda: (t := tis(api, "llm_finetune", child_id).get("plan")) and
                t["state"] in ("up_for_retry", "failed") and t, "faq's plan to run", 120)
    chosen = api.xcom("llm_finetune", child_id, "which_task")
    assert (chosen["task"], chosen["trigger"], chosen["fan_out"]) == ("faq", "retrain_request", [])
    log = api.task_log("llm_finetune", child_id, "plan")
    assert "no validated dataset for task faq yet" in log, log[-2000:]  # a fault: retried, unlike a refusal
    assert plan["try_number"] == 1
    assert len(api.runs("llm_finetune")) == 2  # one run per task, nothing more
    api.request("PATCH", f"/dags/llm_finetune/dagRuns/{child_id}", json={"state": "failed"})  # no need to wait it out


def post_events(api: Any, events: list[tuple[str, dict]]) -> None:
    assets = {a["name"]: a["id"] for a in api.request("GET", "/assets", params={"limit": 100})["assets"]}
    for asset, extra in events:
        api.request("POST", "/assets/events", json={"asset_id": assets[asset], "extra": extra})


def post_queued(api: Any, events: list[tuple[str, dict]]) -> None:
    """Post `events` while the scheduler is stopped, so they wait in the queue together (as
    events do that arrive while a run holds `max_active_runs`), then start it again."""
    from tuneship import services

    services.stop([SCHEDULER])
    post_events(api, events)
    services.start([SCHEDULER])


def new_asset_run(api: Any, dag_id: str, before: set[str]) -> tuple[str, list[str]]:
    """The asset-triggered run of `dag_id` not in `before`, and the tasks of the events it consumed."""
    [run] = wait(lambda: [r for r in api.runs(dag_id) if r["run_type"] == "asset_triggered"
                          and r["dag_run_id"] not in before], f"a new asset-triggered {dag_id} run", 120)
    consumed = api.request("GET", f"/dags/{dag_id}/dagRuns/{run['dag_run_id']}/upstreamAssetEvents")["asset_events"]
    return run["dag_run_id"], [e["extra"]["task"] for e in consumed]


def test_an_event_the_scheduler_leaves_to_no_run_is_still_trained_once(airflow):
    """apache/airflow#56050 on the real 3.3 scheduler: two `validated_dataset` events queued
    together (as when they land while a fine-tune runs) give a run that consumes only the
    first, and the second's queue entry is deleted with the first's, so no run would come for
    it. The run's `which_task` takes it as a stray and fans its task out; the next run, which
    the scheduler hands that event after all, leaves it alone."""

    api = airflow
    before = {r["dag_run_id"] for r in api.runs("llm_finetune")}
    post_queued(api, [("validated_dataset", {"task": "triage", "version_id": "tri-missing-2"}),
                      ("validated_dataset", {"task": "faq", "version_id": "faq-missing-2"})])
    run_id, consumed = new_asset_run(api, "llm_finetune", before)
    # Airflow's part (if this fails, Airflow consumes both now: #56050 is fixed in this version)
    assert consumed == ["triage"]
    chosen = wait(lambda: api.xcom("llm_finetune", run_id, "which_task"), "which_task of the run", 120)
    assert (chosen["task"], chosen["dataset_version"]) == ("triage", "tri-missing-2")
    [stray] = chosen["strays"]
    assert stray.startswith("validated_dataset@")
    child_id = f"fan_out__faq__{run_id}"
    assert chosen["fan_out"] == [{"trigger_run_id": child_id, "conf": {
        "task": "faq", "trigger": "validated_dataset", "dataset_version": "faq-missing-2"}}]
    wait(lambda: finished(api, "llm_finetune", [run_id, child_id]) if child_id in
         {r["dag_run_id"] for r in api.runs("llm_finetune")} else None, "the run and faq's fanned-out run", 240)
    log = api.task_log("llm_finetune", child_id, "plan")
    assert "task faq has no accepted dataset version 'faq-missing-2'" in log, log[-2000:]

    # A later event makes the scheduler hand the stray to the next run: trained once, not twice.
    post_events(api, [("retrain_request", {"task": "triage"})])
    later_id, consumed = new_asset_run(api, "llm_finetune", before | {run_id})
    assert sorted(consumed) == ["faq", "triage"]
    chosen = wait(lambda: api.xcom("llm_finetune", later_id, "which_task"), "which_task of the next run", 120)
    assert (chosen["task"], chosen["trigger"], chosen["fan_out"]) == ("triage", "retrain_request", [])
    assert chosen["already_handled"] == {stray: run_id}
    api.request("PATCH", f"/dags/llm_finetune/dagRuns/{later_id}", json={"state": "failed"})
    assert not [r for r in api.runs("llm_finetune") if r["dag_run_id"].startswith(f"fan_out__faq__{later_id}")]


def test_releases_of_two_tasks_overlap_and_one_task_releases_one_at_a_time(airflow):
    from tuneship import release_slot, services

    api = airflow
    services.start([SCHEDULER])
    a = api.trigger("llm_release", {"task": "triage"})
    b = api.trigger("llm_release", {"task": "faq"})

    def slot_taken(run_id: str) -> bool:
        state = tis(api, "llm_release", run_id).get("take_release_slot", {}).get("state")
        assert state not in ("failed", "upstream_failed"), (run_id, state)
        return state == "success"

    wait(lambda: slot_taken(a), "triage's first release to take its slot", 120)
    # Only now the second triage release: it finds the slot held by a running release.
    c = api.trigger("llm_release", {"task": "triage"})
    runs = wait(lambda: finished(api, "llm_release", [a, b]), "the first two releases to finish", 180)
    assert {runs[a]["state"], runs[b]["state"]} == {"failed"}

    ta, tb = tis(api, "llm_release", a), tis(api, "llm_release", b)
    for t in (ta, tb):
        # failed in reconcile (no gateway), after its retry; the teardown still gave the slot back
        assert (t["reconcile"]["state"], t["reconcile"]["try_number"]) == ("failed", 2)
        assert t["give_back_release_slot"]["state"] == "success"
    assert api.xcom("llm_release", a, "give_back_release_slot") == {"task": "triage", "given_back": True}
    # Different tasks overlap: each took its slot before the other gave its own back.
    assert when(ta["take_release_slot"], "end_date") < when(tb["give_back_release_slot"], "start_date")
    assert when(tb["take_release_slot"], "end_date") < when(ta["give_back_release_slot"], "start_date")
    assert "waiting for the release slot" not in api.task_log("llm_release", b, "take_release_slot")

    # A slot that a finished run never gave back (a killed teardown): faq's, left held by b.
    assert release_slot.try_take("faq", b, run_state=lambda *_: None)["taken"]
    d = api.trigger("llm_release", {"task": "faq"})

    def past_slot(run_id: str) -> dict | None:
        t = tis(api, "llm_release", run_id)
        return t if t.get("reconcile", {}).get("start_date") else None

    tc = wait(lambda: past_slot(c), "triage's second release to get past its slot", 180)
    td = wait(lambda: past_slot(d), "faq's second release to get past its slot", 60)
    # The same task waited (deferred on the triggerer) for the failed first release's give-back.
    log_c = api.task_log("llm_release", c, "take_release_slot")
    assert f"waiting for the release slot of task triage: held by run {a} (running)" in log_c, log_c[-2000:]
    assert tc["take_release_slot"]["state"] == "success"
    assert when(tc["take_release_slot"], "end_date") > when(ta["give_back_release_slot"], "end_date")
    assert when(tc["reconcile"], "start_date") > when(ta["give_back_release_slot"], "end_date")
    # The left-behind slot was taken over at once, after asking Airflow about its holder.
    log_d = api.task_log("llm_release", d, "take_release_slot")
    assert f"over from run {b} (failed)" in log_d and "waiting for" not in log_d, log_d[-2000:]
    assert td["take_release_slot"]["state"] == "success"

    # Marked failed by hand mid-release: the teardown still runs and gives the slot back.
    for run_id in (c, d):
        api.request("PATCH", f"/dags/llm_release/dagRuns/{run_id}", json={"state": "failed"})
    wait(lambda: finished(api, "llm_release", [c, d]), "the later releases to finish", 120)
    for run_id, task in ((c, "triage"), (d, "faq")):
        assert tis(api, "llm_release", run_id)["give_back_release_slot"]["state"] == "success"
        assert api.xcom("llm_release", run_id, "give_back_release_slot") == {"task": task, "given_back": True}
    assert release_slot.holder("triage") is None and release_slot.holder("faq") is None


def test_a_candidate_the_scheduler_leaves_to_no_run_gets_its_own_release(airflow):
    """The same Airflow 3.3 behaviour for `release_candidate`: of two candidates queued together
    the run consumes the first only. Its `which_task` takes the other (another task's) as a
    stray and fans out a release run for it, with that version."""
    from tuneship import release_slot

    api = airflow
    before = {r["dag_run_id"] for r in api.runs("llm_release")}
    post_queued(api, [("release_candidate", {"task": "triage", "version": "91", "package": "/nowhere/t91"}),
                      ("release_candidate", {"task": "faq", "version": "92", "package": "/nowhere/f92"})])
    run_id, consumed = new_asset_run(api, "llm_release", before)
    assert consumed == ["triage"]  # Airflow's part (#56050)
    chosen = wait(lambda: api.xcom("llm_release", run_id, "which_task"), "which_task of the release", 120)
    assert (chosen["task"], chosen["candidate"]["version"]) == ("triage", "91")
    child_id = f"fan_out__faq__{run_id}"
    assert chosen["fan_out"] == [{"trigger_run_id": child_id, "conf": {"task": "faq", "version": "92"}}]
    assert len(chosen["strays"]) == 1
    child = wait(lambda: next((r for r in api.runs("llm_release") if r["dag_run_id"] == child_id), None),
                 "faq's fanned-out release", 60)
    assert child["conf"] == {"task": "faq", "version": "92"}
    fanned = wait(lambda: api.xcom("llm_release", child_id, "which_task"), "which_task of faq's release", 120)
    assert (fanned["task"], fanned["candidate"], fanned["fan_out"]) == ("faq", None, [])
    for rid in (run_id, child_id):
        api.request("PATCH", f"/dags/llm_release/dagRuns/{rid}", json={"state": "failed"})
    wait(lambda: finished(api, "llm_release", [run_id, child_id]), "both releases to finish", 120)
    # Marked failed while `take_release_slot` ran, a run may keep the slot it had just written
    # (its teardown is skipped when its setup did not succeed): left to a finished run, which
    # the next waiter takes over (the test above). Never held by anything else.
    for task in ("triage", "faq"):
        held = release_slot.holder(task)
        assert held is None or held["run_id"] in (run_id, child_id), held
        if held is not None:
            assert release_slot.give_back(task, held["run_id"])


def test_batch_inference_answers_in_chunks_and_a_second_run_redoes_nothing(airflow, tmp_path, tmp_path_factory):
    """`llm_batch_inference` through the scheduler: triage's version 1 (the tiny model,
    compiled as for Triton) over a file of tickets, one mapped instance per chunk, results next
    to the input; the same run again finds every chunk written and answers nothing; a file
    that does not exist fails `plan` once, without a retry."""
    import json
    from pathlib import Path

    from ml_fixtures import base_model

    from tests.tasks import triage
    from tuneship import config, services
    from tuneship.compile import compile_for_triton

    api = airflow
    services.start([SCHEDULER])
    compile_for_triton(str(base_model(tmp_path_factory)), None,
                       config.artifacts() / "tasks" / "triage" / "compiled" / "v1", "llm")
    tickets = tmp_path / "tickets.jsonl"
    tickets.write_text("".join(json.dumps({"id": i, "prompt": r["prompt"]}) + "\n"
                               for i, r in enumerate(triage().examples(10, seed=5))))
    conf = {"task": "triage", "version": 1, "input_uri": str(tickets), "chunk_rows": 4}
    api.unpause("llm_batch_inference")  # its nightly run may start too: no dataset here, it skips
    first = api.trigger("llm_batch_inference", conf)
    again = api.trigger("llm_batch_inference", conf)  # runs after the first (max_active_runs 1)
    missing = api.trigger("llm_batch_inference", {**conf, "input_uri": str(tmp_path / "nowhere.jsonl")})
    ended = wait(lambda: finished(api, "llm_batch_inference", [first, again, missing]), "the batch runs", 400)
    assert (ended[first]["state"], ended[again]["state"], ended[missing]["state"]) == ("success", "success", "failed")

    t1 = tis(api, "llm_batch_inference", first)
    chunks = sorted(k for k in t1 if k.startswith("answer_chunk["))
    assert len(chunks) == 3 and all(t1[k]["state"] == "success" for k in chunks)
    assert sorted(t1[k]["rendered_map_index"] for k in chunks) == ["triage 1/3", "triage 2/3", "triage 3/3"]
    [summary] = api.xcom("llm_batch_inference", first, "finish")
    results = Path(summary["results"])
    assert results.parent.parent == tickets.with_name("tickets.jsonl.batch")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(10)) and summary["completion_tokens"] > 0
    assert summary["cost_per_1k_tokens"] > 0 and Path(summary["report"]).is_file()
    log = api.task_log("llm_batch_inference", first, "answer_chunk", map_index=0)
    assert "chunk 1/3: 4/4 rows" in log, log[-2000:]

    t2 = tis(api, "llm_batch_inference", again)
    assert api.xcom("llm_batch_inference", again, "plan", map_index=0)["done"] == [0, 1, 2]
    assert not [k for k in t2 if k.startswith("answer_chunk[")] and t2["finish"]["state"] == "success"
    assert [json.loads(line) for line in results.read_text().splitlines()] == rows

    t3 = tis(api, "llm_batch_inference", missing)
    [plan] = [v for k, v in t3.items() if k.startswith("plan")]
    assert (plan["state"], plan["try_number"]) == ("failed", 1)
    assert "nowhere.jsonl does not exist" in api.task_log("llm_batch_inference", missing, "plan", map_index=0)
