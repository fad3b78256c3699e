"""Approval before the switch through Airflow's REAL human-in-the-loop API (issue 15): the
release's `ReleaseApprovalOperator` in a test DAG (`tests/fixtures/dags/approval_release.py`:
the approval step between a window verdict and the decision, without serving around it),
run by the real scheduler, answered with `PATCH .../hitlDetails` as the UI's Required
Actions page does.

* a candidate whose hyperparameters differ from the champion's waits in `awaiting_input`;
  the request names the change with both values, the figures and the links;
* Approve promotes, saying who approved and their comment; Reject rolls back, saying who;
* no answer within the task's timeout (`approval.on_timeout: rollback`) rolls back: Airflow's
  scheduler applies the declared default;
* a candidate with the champion's lineage is not held at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from approval_stack import DAG, approval_airflow, finished, release, state, version
from waiting import wait

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    home = tmp_path_factory.mktemp("approval-airflow")
    with approval_airflow(home) as api:
        yield api, home


def hitl(api: Any, run_id: str) -> str:
    return f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails"


@pytest.mark.parametrize(("answer", "comment", "verdict", "said"), [
    ("Approve", "lr sweep reviewed", "promote", "approved by admin: 'lr sweep reviewed'"),
    ("Reject", "", "rollback", "refused by admin")])
def test_a_changed_candidate_waits_for_a_person_who_decides(airflow: tuple[Any, Path], answer: str, comment: str,
                                                            verdict: str, said: str):
    api, home = airflow
    v = version("gated", f"candidate-{answer}", recipe_hash="h2", lora_r="16", home=home)
    run_id = release(api, "gated", v)
    wait(lambda: state(api, run_id, "approval") == "awaiting_input", "the approval to wait for a person", 180)
    detail = api.request("GET", hitl(api, run_id))
    assert detail["subject"] == f"Release gated v{v}?" and detail["options"] == ["Approve", "Reject"]
    body = detail["body"]
    assert 'hyperparameters changed against the champion: {"lora_r": "8"} -> {"lora_r": "16"}' in body
    assert "p95 454 ms" in body and "412 requests" in body and "agreement with live 91%" in body
    assert f"/tuneship/reports/model-card-gated-v{v}.html" in body and f"/dags/{DAG}/runs/" in body
    assert state(api, run_id, "decide") in (None, "none")  # nothing decided while a person is asked

    # A person reads first. (An answer within about a second of the request races Airflow 3.3's
    # LocalExecutor: the parked process's late "success" report fails the resumed task.)
    time.sleep(5)
    api.request("PATCH", hitl(api, run_id), json={"chosen_options": [answer], "params_input": {"comment": comment}})
    decided = finished(api, run_id)
    assert decided["verdict"] == verdict and said in decided["reasons"][-1]
    answered = api.xcom(DAG, run_id, "approval")
    assert (answered["asked"], answered["approved"], answered["by"], answered["timed_out"]) == \
        (True, answer == "Approve", "admin", False)
    # the request and the answer are in the audit trail (the person as actor) and on Slack
    from approval_stack import trail
    records = trail(home, "gated", v)
    assert [r["action"] for r in records] == ["approval_requested", "approved" if answer == "Approve" else "refused"]
    assert records[0]["actor"] == "airflow:approval_release/approval" and "hyperparameters" in records[0]["reason"]
    assert records[1]["actor"] == "admin" and records[1]["reason"] == (comment or "no comment")
    # answered once: a second answer is refused by Airflow
    with pytest.raises(Exception, match="409"):
        api.request("PATCH", hitl(api, run_id), json={"chosen_options": ["Approve"]})


def test_no_answer_within_the_timeout_rolls_back(airflow: tuple[Any, Path]):
    api, home = airflow
    v = version("gated_quick", "quick-candidate", recipe_hash="h1", lora_r="8", home=home)
    run_id = release(api, "gated_quick", v)
    decided = finished(api, run_id)  # nobody answers: the scheduler applies the declared default
    assert decided["verdict"] == "rollback"
    assert decided["reasons"] == ["no answer within the approval timeout (0.003 h)"]
    answered = api.xcom(DAG, run_id, "approval")
    assert answered["asked"] and answered["timed_out"] and answered["by"] is None and not answered["approved"]
    from approval_stack import trail
    assert [(r["action"], r["actor"]) for r in trail(home, "gated_quick", v)] == \
        [("approval_requested", "airflow:approval_release/approval"), ("refused", "airflow:timeout")]


def test_a_candidate_with_the_champions_lineage_is_not_held(airflow: tuple[Any, Path]):
    api, home = airflow
    v = version("gated", "same-lineage", recipe_hash="h1", lora_r="8", home=home)
    run_id = release(api, "gated", v)
    decided = finished(api, run_id)
    assert decided["verdict"] == "promote" and "approval" not in decided
    assert api.xcom(DAG, run_id, "approval") == {"asked": False, "reasons": [], "approved": None}
