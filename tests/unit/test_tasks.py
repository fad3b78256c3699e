"""Task files: validated on load with the file and key named; functions found beside the file;
names unique across tasks; the same checks from the CLI the pre-commit hook runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneship.tasks import TASKS_DIR, TaskError, load_task, load_task_file, load_tasks, task_names

REPO = Path(__file__).resolve().parents[2]


def test_shipped_tasks_load_with_their_own_names_and_colours():
    tasks = load_tasks()
    assert {"triage", "faq"} <= set(tasks) and task_names() == sorted(tasks)
    triage, faq = tasks["triage"], tasks["faq"]
    assert (triage.prompt_format, faq.prompt_format) == ("plain", "chat")
    assert len({t.served_model for t in tasks.values()}) == len(tasks)
    assert len({t.registered_model for t in tasks.values()}) == len(tasks)
    assert triage.colour_models() == {"triage_blue", "triage_green"}
    assert faq.colour_models().isdisjoint(triage.colour_models())
    assert triage.landing() != faq.landing()
    # each task's own code answers for it
    assert triage.conforms(" category=billing priority=high") and not triage.conforms("Returns take 30 days.")
    assert triage.parser(" category=returns priority=low") == {"category": "returns", "priority": "low"}


def test_the_library_names_no_demo_task():
    """The issue's rule: a grep for the demo tasks under include/tuneship finds nothing."""
    found = subprocess.run(["grep", "-rniE", r"triage|\bfaq\b", str(REPO / "include" / "tuneship"),
                            "--include=*.py", "--include=*.yaml", "--include=*.json"],
                           capture_output=True, text=True).stdout
    assert found == ""


def write_task(tmp_path: Path, stem: str = "third", **changes) -> Path:
    name = stem
    data = yaml.safe_load((TASKS_DIR / "triage.yaml").read_text())
    data.update(name=name, registered_model=f"tuneship-{name}", served_model=name,
                answers={"parser": "third_task:parse", "fields": ["label"], "check": "third_task:ok"})
    data.pop("demo", None)
    for key, value in changes.items():
        node, *path = key.split(".")
        if path:
            data[node] = {**data[node], path[0]: value}
        elif value is None:
            data.pop(node, None)
        else:
            data[node] = value
    (tmp_path / "third_task.py").write_text(
        "def parse(text):\n    return {'label': text.strip() or None}\n\n"
        "def ok(text):\n    return bool(text.strip())\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_task_beside_its_own_module_needs_no_library_change(tmp_path, monkeypatch):
    path = write_task(tmp_path)
    task = load_task_file(path)
    assert task.parser(" yes ") == {"label": "yes"} and task.conforms("x") and not task.conforms(" ")
    monkeypatch.setenv("TUNESHIP_TASK_PATH", str(tmp_path))
    assert "third" in task_names() and load_task("third").path == path.resolve()


@pytest.mark.parametrize("changes, key, words", [
    ({"surprise": 1}, "surprise", "unknown key"),
    ({"served_model": None}, "served_model", "required key is missing"),
    ({"prompt_format": "xml"}, "prompt_format", "'plain' or 'chat'"),
    ({"eval": {"suites": ["no-such-suite"], "smoke": "triage-smoke"}}, "eval.suites", "no such eval suite"),
    ({"eval": {"suites": ["triage-smoke"], "smoke": "triage-smoke"}}, "eval.suites", "has role 'smoke'"),
    ({"eval": {"suites": ["triage"], "smoke": "triage"}}, "eval.smoke", "a smoke suite (`role: smoke`)"),
    ({"answers": {"parser": "third_task:nope", "fields": ["x"], "check": "third_task:ok"}}, "answers.parser",
     "has no function 'nope'"),
    ({"answers": {"parser": "third_task:parse", "fields": ["x"], "check": "missing_module:ok"}}, "answers.check",
     "no module missing_module.py"),
    ({"recipe": "no-such-recipe"}, "recipe", "no recipe"),
    ({"release.max_error_rate": 2}, "release.max_error_rate", "less than or equal to 1"),
    ({"name": "other"}, "name", "must equal the file name"),
    ({"serving": {"max_cost_per_1k_tokens": 0.01}}, "serving", "needs price_per_hour"),
    ({"serving": {"requests": 5}}, "serving.requests", "greater than or equal to 20"),
])
def test_a_broken_task_file_names_the_file_and_the_key(tmp_path, changes, key, words):
    path = write_task(tmp_path, **changes)
    with pytest.raises(TaskError) as err:
        load_task_file(path)
    msg = str(err.value)
    assert str(path) in msg and f"key '{key}'" in msg and words in msg, msg


def test_a_served_name_that_clashes_with_another_task_is_refused(tmp_path, monkeypatch):
    write_task(tmp_path, served_model="triage")
    monkeypatch.setenv("TUNESHIP_TASK_PATH", str(tmp_path))
    with pytest.raises(TaskError, match=r"third.yaml: key 'served_model': 'triage' is already used by task 'triage'"):
        load_tasks()
    with pytest.raises(TaskError, match="already used"):  # loading either task finds it
        load_task("triage")


def test_chat_prompts_carry_the_system_prompt_once(tmp_path):
    task = load_task_file(write_task(tmp_path, prompt_format="chat", system_prompt="Be brief."))
    assert task.render_prompt("hi") == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "hi"}]
    own = [{"role": "system", "content": "Other."}, {"role": "user", "content": "hi"}]
    assert task.render_prompt(own) == own
    plain = load_task_file(write_task(tmp_path))
    with pytest.raises(TaskError, match="prompt_format plain"):
        plain.render_prompt(own)


def test_tokenizer_check_finds_a_task_its_tokenizer_cannot_serve(tmp_path_factory, tmp_path):
    from ml_fixtures import base_model
    from transformers import AutoTokenizer

    from tuneship.tasks import tokenizer_problems

    tok = AutoTokenizer.from_pretrained(str(base_model(tmp_path_factory)))
    chat = load_task_file(write_task(tmp_path, prompt_format="chat"))
    assert tokenizer_problems(chat, tok) == []
    assert tokenizer_problems(load_task_file(write_task(tmp_path)), tok) == []
    tok.chat_template = None
    assert tokenizer_problems(chat, tok) == ["prompt_format is chat but the tokenizer has no chat_template"]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    assert any("not a prefix" in p for p in tokenizer_problems(chat, tok))


def test_cli_check_is_what_the_pre_commit_hook_runs(tmp_path):
    hooks = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    entries = [h["entry"] for r in hooks["repos"] for h in r["hooks"]]
    assert any(e.endswith("tuneship tasks check") for e in entries)
    cli = [sys.executable, "-c", "from tuneship.cli import main; main()", "tasks", "check"]
    env = {"PATH": "/usr/bin:/bin", "TUNESHIP_HOME": str(tmp_path / "home")}
    ok = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "ok:" in ok.stderr and "triage" in ok.stderr, ok.stderr
    broken = tmp_path / "tasks"
    broken.mkdir()
    bad = write_task(broken, surprise=1)
    r = subprocess.run(cli, capture_output=True, text=True, env={**env, "TUNESHIP_TASK_PATH": str(broken)})
    assert r.returncode == 2 and str(bad) in r.stderr and "key 'surprise'" in r.stderr, r.stderr
