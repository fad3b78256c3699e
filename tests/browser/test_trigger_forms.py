"""The trigger forms in Airflow's UI, driven in a real browser (Debian's chromium).

Each DAG's dialog is submitted as a person would; what arrives is read back through the
REST API and compared with what the DAG's Params declare. The DAGs stay paused and no
scheduler runs, so the runs stay queued and nothing is trained or released.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

pytestmark = pytest.mark.browser

# Params whose empty value means "use the default": the form must not mark them required.
EMPTY_MEANS_DEFAULT = {
    "llm_data_validation": ["dataset_uri"],
    "llm_finetune": ["base_model", "recipe", "lora_r", "lora_alpha", "epochs", "max_steps", "learning_rate"],
    "llm_release": ["version"],
    "llm_drift_monitor": ["window_hours", "threshold", "min_requests", "debounce", "cooldown_hours"],
}


def _open_dialog(page, ui, dag_id: str):
    """The DAG page's Trigger dialog, with 'Unpause on trigger' (checked by default) off."""
    page.goto(f"{ui.base_url}/dags/{dag_id}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    unpause = dialog.get_by_label(f"Unpause {dag_id} on trigger")
    if unpause.is_checked():
        dialog.get_by_text(f"Unpause {dag_id} on trigger").click()
    assert not unpause.is_checked()
    return dialog


def _field(dialog, name: str):
    return dialog.locator(f"input[name=element_{name}]")


def _set_run_id(dialog, run_id: str) -> None:
    dialog.get_by_text("Advanced Options").click()
    dialog.locator("input[name=dagRunId]").fill(run_id)


def _submit(page, dialog, dag_id: str):
    """Click Trigger and return the API server's answer to the form's POST."""
    button = dialog.get_by_role("button", name="Trigger")
    assert button.is_enabled(), f"{dag_id}: the Trigger button is disabled"
    with page.expect_response(lambda r: r.request.method == "POST"
                              and r.url.endswith(f"/api/v2/dags/{dag_id}/dagRuns")) as answer:
        button.click()
    return answer.value


def _declared(ui, dag_id: str) -> dict:
    r = ui.api(f"/dags/{dag_id}/details")
    assert r.status_code == 200, r.text
    return r.json()["params"]


@pytest.mark.parametrize("dag_id", sorted(EMPTY_MEANS_DEFAULT))
def test_form_submits_with_its_defaults_and_they_round_trip(page, airflow_ui, login, screenshot, dag_id):
    login(page)
    dialog = _open_dialog(page, airflow_ui, dag_id)
    declared = _declared(airflow_ui, dag_id)
    for name in EMPTY_MEANS_DEFAULT[dag_id]:
        field = _field(dialog, name)
        assert field.count() == 1, f"{dag_id}: no form field for {name}"
        assert field.get_attribute("required") is None, f"{dag_id}: {name} is marked required"
        assert field.input_value() == "", f"{dag_id}: {name} is not empty by default"
    screenshot(f"trigger-{dag_id}")
    run_id = f"browser_defaults_{dag_id}"
    _set_run_id(dialog, run_id)

    answer = _submit(page, dialog, dag_id)
    assert answer.status == 200, answer.text()
    dialog.wait_for(state="hidden")

    r = airflow_ui.api(f"/dags/{dag_id}/dagRuns/{run_id}")
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["state"] == "queued" and run["run_type"] == "manual"
    conf = run["conf"]
    assert conf == {name: p["value"] for name, p in declared.items()}
    for name, p in declared.items():
        jsonschema.validate(conf[name], p["schema"])  # int stays int, null stays null
    assert airflow_ui.api(f"/dags/{dag_id}").json()["is_paused"] is True


def test_typed_values_arrive_with_their_json_types(page, airflow_ui, login):
    dag_id = "llm_finetune"
    login(page)
    dialog = _open_dialog(page, airflow_ui, dag_id)
    _field(dialog, "base_model").fill("HuggingFaceTB/SmolLM2-135M-Instruct")
    _field(dialog, "lora_r").fill("8")
    _field(dialog, "learning_rate").fill("0.0005")
    task, runner = dialog.get_by_role("combobox").nth(0), dialog.get_by_role("combobox").nth(1)
    task.click()  # the Task dropdown lists the task files
    listed = set(page.get_by_role("option").all_inner_texts())
    assert {"triage", "faq"} <= listed, listed
    page.get_by_role("option", name="faq", exact=True).click()
    runner.click()
    page.get_by_role("option", name="docker").click()
    run_id = "browser_typed_llm_finetune"
    _set_run_id(dialog, run_id)

    answer = _submit(page, dialog, dag_id)
    assert answer.status == 200, answer.text()
    conf = airflow_ui.api(f"/dags/{dag_id}/dagRuns/{run_id}").json()["conf"]
    assert conf["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert conf["lora_r"] == 8 and type(conf["lora_r"]) is int
    assert conf["learning_rate"] == 0.0005 and type(conf["learning_rate"]) is float
    assert conf["runner"] == "docker" and conf["task"] == "faq"
    assert conf["lora_alpha"] is None and conf["epochs"] is None
    assert conf["recipe"] is None


def test_invalid_value_keeps_the_dialog_open_and_says_why(page, airflow_ui, login, screenshot):
    """LoRA rank 0 typed into the dialog's Configuration JSON: the API server refuses it,
    the dialog stays open and shows the reason, and no run exists."""
    dag_id = "llm_finetune"
    login(page)
    dialog = _open_dialog(page, airflow_ui, dag_id)
    run_id = "browser_invalid_llm_finetune"
    _set_run_id(dialog, run_id)
    editor = dialog.locator(".monaco-editor .view-lines")
    editor.click()
    page.keyboard.press("Control+A")
    page.evaluate("text => navigator.clipboard.writeText(text)",
                  json.dumps({"lora_r": 0, "runner": "local"}, indent=2))
    page.keyboard.press("Control+V")

    answer = _submit(page, dialog, dag_id)
    assert answer.status == 400, answer.text()
    message = dialog.get_by_text("Invalid input for param lora_r")
    message.wait_for()
    assert "less than the minimum of 1" in message.inner_text()
    assert dialog.is_visible()
    screenshot("trigger-invalid-lora_r")
    assert airflow_ui.api(f"/dags/{dag_id}/dagRuns/{run_id}").status_code == 404
