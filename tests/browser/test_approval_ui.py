"""A person approves or refuses a release from the Airflow UI (issue 15), in chromium: the
release's approval request (`tests/fixtures/dags/approval_release.py`, the real scheduler)
opens in Airflow's own Required Actions review, shows why it asks with the figures, and a
click on Reject with a comment rolls the release back, recorded with who and why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from approval_stack import DAG, approval_airflow, finished, release, state, version
from waiting import wait

from tuneship import services

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    home = tmp_path_factory.mktemp("approval-ui")
    with approval_airflow(home) as api:
        yield api, home


def test_a_person_refuses_a_release_from_the_ui(page, airflow, screenshot):
    api, home = airflow
    v = version("gated", "ui-candidate", recipe_hash="h2", lora_r="16", home=home)
    run_id = release(api, "gated", v)
    wait(lambda: state(api, run_id, "approval") == "awaiting_input", "the approval to wait for a person", 180)
    base = api.base_url
    page.goto(f"{base}/dags/{DAG}/runs/{run_id}/tasks/approval/required_actions")
    page.get_by_label("Username").fill(services.ADMIN_USER)
    page.get_by_label("Password").fill(services.admin_password())
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Release gated v{v}?").first.wait_for()
    screenshot("approval-request")
    assert page.get_by_text("hyperparameters changed against the champion").first.is_visible()
    # Airflow's form field for the `comment` Param (its label is not tied to the input)
    page.locator("input[name='element_comment']").fill("lr sweep not reviewed yet")
    page.get_by_role("button", name="Reject").click()
    decided = finished(api, run_id)
    screenshot("approval-answered")
    assert decided["verdict"] == "rollback"
    assert decided["reasons"] == ["refused by admin: 'lr sweep not reviewed yet'"]
    answered = api.xcom(DAG, run_id, "approval")
    assert (answered["by"], answered["approved"], answered["timed_out"]) == ("admin", False, False)
