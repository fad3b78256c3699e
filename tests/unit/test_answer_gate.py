"""The task's data gate (`answer_format`): answers that do not fit the task are quarantined,
and a batch whose answers mostly do not fit is refused.

The incident it prevents: a batch of bank FAQ answers landed where triage data lands, passed
validation, became a dataset version and was fine-tuned into the triage model. The task's
check is a real module file imported by path (here and in spawned worker processes), shaped
like a task module: `answer_conforms(text) -> bool` over the triage parser.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from tuneship.data import (
    AnswerCheck,
    ValidationReport,
    load_config,
    load_manifest,
    validate_dataset,
    version_dataset,
)

TASK_MODULE = '''
"""A triage task's answer check, as a task module declares it."""
from __future__ import annotations

import os
import re
from pathlib import Path

# each import of this module (one per process) leaves the process id behind
with Path(__file__).with_suffix(".imports").open("a", encoding="utf-8") as fh:
    fh.write(f"{os.getpid()}\\n")

_TRIAGE_RE = re.compile(r"category\\s*=\\s*([a-z]+)\\s+priority\\s*=\\s*([a-z]+)")
CATEGORIES = ("billing", "shipping", "returns", "account", "technical")
PRIORITIES = ("low", "normal", "high")


def parse_triage(text: str) -> dict[str, str | None]:
    m = _TRIAGE_RE.search(text or "")
    if not m:
        return {"category": None, "priority": None}
    return {
        "category": m.group(1) if m.group(1) in CATEGORIES else None,
        "priority": m.group(2) if m.group(2) in PRIORITIES else None,
    }


def answer_conforms(text: str) -> bool:
    fields = parse_triage(text)
    return fields["category"] is not None and fields["priority"] is not None


def answer_or_raise(text: str) -> bool:
    if "APY" in text:
        raise RuntimeError("cannot parse bank prose")
    return answer_conforms(text)


NOT_A_FUNCTION = 3
'''
DESCRIBE = "triage_task:answer_conforms (fields category, priority)"

CATS = ["billing", "shipping", "returns", "account", "technical"]
PRIS = ["low", "normal", "high"]
ITEMS = ["blender", "jacket", "headphones", "sofa", "lamp", "monitor", "backpack", "kettle"]
ISSUES = [
    "was charged twice for my {i}",
    "my {i} has not arrived yet",
    "want to return the {i}",
    "cannot log in to see my {i} order",
    "the {i} arrived damaged",
    "refund for the {i} is still pending",
]
FAQ = [
    "Our savings accounts earn {n}.10% APY, paid monthly into your balance.",
    "You can reset your online banking password from the sign-in page in {n} minutes.",
    "Wire transfers sent before {n} pm are processed the same business day.",
    "Overdraft protection links your checking account to savings, up to {n} transfers a day.",
    "Mortgage pre-approval usually takes {n} business days once documents are uploaded.",
]


def tickets(n: int, seed: int = 3) -> list[dict[str, str]]:
    """Distinct triage rows whose answers fit the task."""
    r = random.Random(seed)
    out: list[dict[str, str]] = []
    for k in range(n):
        issue = r.choice(ISSUES).format(i=r.choice(ITEMS))
        out.append(
            {
                "prompt": f"Ticket: {issue}, order {10000 + k}.\nTriage:",
                "completion": f" category={r.choice(CATS)} priority={r.choice(PRIS)}",
            }
        )
    return out


def faq_answer(k: int) -> str:
    return " " + FAQ[k % len(FAQ)].format(n=2 + k % 7)


def bank_faq(n: int, start: int = 0) -> list[dict[str, str]]:
    """The incident: bank FAQ answers, landed as triage data."""
    return [
        {
            "prompt": f"Ticket: customer question {start + k} about their account\nTriage:",
            "completion": faq_answer(k),
        }
        for k in range(n)
    ]


def write_dataset(root: Path, train: list[Any], eval_: list[Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", eval_)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def task_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "triage_task.py"
    path.write_text(TASK_MODULE, encoding="utf-8")
    return path


def gate(module: Path, min_share: float = 0.95, function: str = "answer_conforms") -> AnswerCheck:
    return AnswerCheck(
        task="triage",
        module_file=str(module),
        function=function,
        min_share=min_share,
        describe=DESCRIBE,
    )


def misfit_rows(report: ValidationReport) -> dict[tuple[str, int], dict[str, Any]]:
    q = [json.loads(x) for x in Path(report.quarantine_path).read_text().splitlines()]
    return {(r["split"], r["line"]): r for r in q if "answer_format" in r["reasons"]}


# --------------------------------------------------------------------- verdicts


def test_conforming_batch_is_accepted_and_records_the_gate(
    task_module: Path, tmp_path: Path
) -> None:
    rows = tickets(720)
    ds = write_dataset(tmp_path / "ds", rows[:600], rows[600:])
    report = validate_dataset(ds, workdir=tmp_path / "wd", answer_check=gate(task_module))
    assert report.accepted, report.summary()
    c = report.check("answer_format")
    assert c.passed and c.severity == "error"
    assert c.figures["task"] == "triage" and c.figures["declared"] == DESCRIBE
    assert c.figures["failing_rows"] == 0 and c.figures["conforming_share"] == 1.0
    assert c.figures["min_share"] == 0.95 and c.figures["max_fraction"] == 0.05
    assert set(c.figures["by_split"]) == {"train", "eval"}
    assert c.figures["by_split"]["train"]["column"] == "answer_misfit"
    assert report.quarantine_count == 0
    assert report.config["answer_check"]["module_file"] == str(task_module)
    assert report.config["version"] == 4
    docs = "".join(p.read_text(errors="replace") for p in Path(report.workdir).rglob("*.html"))
    assert "answer_misfit" in docs  # Data Docs render the gate's expectation

    # existing callers: no task check, no answer_format (not run, not reported)
    plain = validate_dataset(ds, workdir=tmp_path / "wd2")
    assert plain.accepted and "answer_format" not in {x.name for x in plain.checks}
    assert "answer_check" not in plain.config


def test_bank_faq_batch_landed_as_triage_is_rejected(task_module: Path, tmp_path: Path) -> None:
    """The incident: every answer is bank FAQ prose; the batch must not become a version."""
    ds = write_dataset(tmp_path / "ds", bank_faq(600), bank_faq(120, start=1000))
    report = validate_dataset(ds, workdir=tmp_path / "wd", answer_check=gate(task_module))
    assert not report.accepted
    assert "answer_format" in {c.name for c in report.failed_checks}
    c = report.check("answer_format")
    assert c.figures["conforming_share"] == 0.0 and c.figures["failing_rows"] == 720
    assert c.sample_lines == {
        "train.jsonl": list(range(1, 11)),
        "eval.jsonl": list(range(1, 11)),
    }
    text = report.summary()
    assert "REJECTED" in text and "answer_format [error]" in text
    assert "task=triage" in text and f"declared={DESCRIBE}" in text
    assert "conforming_share=0," in text and "min_share=0.95" in text
    assert "train.jsonl:1,2,3,4,5,6,7,8,9,10" in text
    assert "first_reason=train.jsonl:1: answer does not fit task 'triage'" in text
    assert "do not fit task 'triage'" in text and "land it there" in text
    assert report.quarantine_path in text
    rec = misfit_rows(report)[("train", 1)]
    assert rec["reasons"]["answer_format"] == f"answer does not fit task 'triage' ({DESCRIBE})"
    assert rec["row"]["completion"] == faq_answer(0)
    with pytest.raises(ValueError, match="rejected"):
        version_dataset(ds, report, artifacts_root=tmp_path / "artifacts")


def test_a_few_misfits_are_quarantined_and_left_out_of_the_version(
    task_module: Path, tmp_path: Path
) -> None:
    rows = tickets(720, seed=8)
    train, eval_ = rows[:600], rows[600:]
    bad_train = [4, 150, 333, 599]  # lines: under 1% of the split
    for line in bad_train:
        train[line - 1] = {**train[line - 1], "completion": faq_answer(line)}
    train[199] = {**train[199], "completion": " category=weather priority=high"}  # unknown label
    eval_[6] = {**eval_[6], "completion": " priority=high category=billing"}  # wrong order
    ds = write_dataset(tmp_path / "ds", train, eval_)
    report = validate_dataset(ds, workdir=tmp_path / "wd", answer_check=gate(task_module))
    assert report.accepted, report.summary()
    c = report.check("answer_format")
    assert c.passed and c.figures["failing_rows"] == 6
    assert c.figures["conforming_share"] == pytest.approx(1 - 1 / 120)  # eval's share
    assert report.quarantine_count == 6
    assert report.quarantined_lines == {"train": sorted([*bad_train, 200]), "eval": [7]}
    assert set(misfit_rows(report)) == {("train", x) for x in [*bad_train, 200]} | {("eval", 7)}
    assert "Rows quarantined by passing checks:" in report.summary()

    v = version_dataset(ds, report, artifacts_root=tmp_path / "artifacts")
    assert load_manifest(v.path)["rows"] == {"train": 595, "eval": 119}
    kept = (Path(v.path) / "train.jsonl").read_text() + (Path(v.path) / "eval.jsonl").read_text()
    assert "APY" not in kept and "weather" not in kept and "priority=high category" not in kept


def test_the_task_threshold_decides_not_the_suite(task_module: Path, tmp_path: Path) -> None:
    """3% misfits: inside the suite's 5% quarantine budget, but the task asks for 99%."""
    rows = tickets(720, seed=9)
    train = rows[:600]
    for line in range(10, 600, 33):  # 18 rows = 3%
        train[line - 1] = {**train[line - 1], "completion": faq_answer(line)}
    ds = write_dataset(tmp_path / "ds", train, rows[600:])
    strict = validate_dataset(ds, workdir=tmp_path / "a", answer_check=gate(task_module, 0.99))
    assert not strict.accepted
    assert [c.name for c in strict.failed_checks] == ["answer_format"]
    assert strict.check("answer_format").figures["max_fraction"] == pytest.approx(0.01)
    assert "min_share=0.99" in strict.summary()
    lenient = validate_dataset(ds, workdir=tmp_path / "b", answer_check=gate(task_module, 0.95))
    assert lenient.accepted, lenient.summary()
    assert lenient.quarantine_count == 18


def test_chat_rows_are_judged_by_their_last_assistant_message(
    task_module: Path, tmp_path: Path
) -> None:
    def chat(row: dict[str, str], first: str, last: str) -> dict[str, Any]:
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And the priority again?"},
                {"role": "assistant", "content": last},
            ]
        }

    rows = tickets(132, seed=4)
    good = [chat(r, "Let me look at it.", r["completion"].strip()) for r in rows]
    good[2] = chat(rows[2], rows[2]["completion"], faq_answer(2))  # fits, then drifts off
    ds = write_dataset(tmp_path / "ds", good[:120], good[120:])
    report = validate_dataset(ds, workdir=tmp_path / "wd", answer_check=gate(task_module))
    assert report.schema == "chat"
    assert report.check("answer_format").sample_lines == {"train.jsonl": [3]}
    assert report.quarantined_lines == {"train": [3], "eval": []}


def test_a_function_raising_on_an_answer_rejects_that_row(
    task_module: Path, tmp_path: Path
) -> None:
    rows = tickets(132, seed=6)
    rows[9] = {**rows[9], "completion": faq_answer(0)}  # savings APY prose: the function raises
    rows[10] = {**rows[10], "completion": faq_answer(1)}  # other prose: returns False
    ds = write_dataset(tmp_path / "ds", rows[:120], rows[120:])
    report = validate_dataset(
        ds, workdir=tmp_path / "wd", answer_check=gate(task_module, function="answer_or_raise")
    )
    reasons = {k[1]: r["reasons"]["answer_format"] for k, r in misfit_rows(report).items()}
    assert reasons == {
        10: f"answer does not fit task 'triage' ({DESCRIBE}): answer_or_raise raised "
        "RuntimeError: cannot parse bank prose",
        11: f"answer does not fit task 'triage' ({DESCRIBE})",
    }


# --------------------------------------------------------------------- worker processes


def test_worker_processes_give_the_same_result_as_inline(
    task_module: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two spawned workers import the task module themselves (once each) and screen every
    block: same verdicts, lines, figures and quarantine as the inline run."""
    from tuneship.data import reader, validate

    rows = tickets(1500, seed=12)
    train, eval_ = rows[:1300], rows[1300:]
    for line in range(7, 1300, 97):
        train[line - 1] = {**train[line - 1], "completion": faq_answer(line)}
    eval_[40] = {**eval_[40], "completion": faq_answer(1)}
    ds = write_dataset(tmp_path / "ds", train, eval_)
    monkeypatch.setattr(reader, "BLOCK_BYTES", 4096)  # dozens of blocks, many in flight
    check = gate(task_module)
    inline = validate_dataset(ds, workdir=tmp_path / "inline", workers=0, answer_check=check)

    imports = task_module.with_suffix(".imports")
    imports.unlink(missing_ok=True)
    boot = validate._Screener.__init__

    def booted(self: Any, *args: Any, **kwargs: Any) -> None:
        """Wait until the workers are up, so they (not this process) screen every block."""
        boot(self, *args, **kwargs)
        for f in self._booting:
            f.result()

    monkeypatch.setattr(validate._Screener, "__init__", booted)
    parallel = validate_dataset(ds, workdir=tmp_path / "parallel", workers=2, answer_check=check)

    pids = imports.read_text().split() if imports.exists() else []
    assert pids, "the task module was never imported"
    assert len(pids) == len(set(pids)), f"imported more than once in a process: {pids}"
    assert set(pids) - {str(os.getpid())}, "no worker process imported the task module"
    assert inline.accepted and parallel.accepted
    assert inline.check("answer_format").figures["failing_rows"] == 15
    assert parallel.quarantined_lines == inline.quarantined_lines
    assert [
        (c.name, c.passed, c.figures.get("failing_rows"), c.sample_lines) for c in parallel.checks
    ] == [(c.name, c.passed, c.figures.get("failing_rows"), c.sample_lines) for c in inline.checks]
    assert Path(parallel.quarantine_path).read_text() == Path(inline.quarantine_path).read_text()


# --------------------------------------------------------------------- broken declarations


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            {"module_file": "/nonexistent/triage_task.py"},
            r"/nonexistent/triage_task\.py does not exist",
        ),
        ({"function": "answer_fits"}, r"answer_fits is not defined in .*triage_task\.py"),
        ({"function": "NOT_A_FUNCTION"}, r"NOT_A_FUNCTION is not a function"),
    ],
)
def test_a_declaration_that_cannot_load_fails_before_reading_data(
    task_module: Path, tmp_path: Path, change: dict[str, str], needle: str
) -> None:
    base = gate(task_module)
    check = dataclasses.replace(base, **change)
    # the dataset does not even exist: the declaration is checked first
    with pytest.raises(ValueError, match=rf"task 'triage': answer check .*{needle}"):
        validate_dataset(tmp_path / "no-such-dataset", workdir=tmp_path / "wd", answer_check=check)


def test_a_module_that_fails_to_import_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken_task.py"
    broken.write_text("import no_such_package_here\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"importing .*broken_task\.py failed \(ModuleNotFoundError"
    ):
        validate_dataset(tmp_path / "ds", workdir=tmp_path / "wd", answer_check=gate(broken))


def test_a_function_not_returning_a_bool_is_refused(task_module: Path, tmp_path: Path) -> None:
    """parse_triage returns a dict (always truthy): taking it as 'conforms' would let the
    incident through, so the gate refuses the declaration instead."""
    rows = tickets(132)
    ds = write_dataset(tmp_path / "ds", rows[:120], rows[120:])
    with pytest.raises(ValueError, match=r"parse_triage in .* returned dict .* must return True"):
        validate_dataset(
            ds, workdir=tmp_path / "wd", answer_check=gate(task_module, function="parse_triage")
        )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"min_share": 1.5}, "min_share is 1.5"),
        ({"module_file": "triage_task.py"}, "not an absolute path"),
        ({"function": "answer conforms"}, "not a Python function name"),
    ],
)
def test_answer_check_fields_are_validated(change: dict[str, Any], needle: str) -> None:
    fields = {
        "task": "triage",
        "module_file": "/abs/triage_task.py",
        "function": "answer_conforms",
        "min_share": 0.95,
        "describe": DESCRIBE,
    }
    with pytest.raises(ValueError, match=needle):
        AnswerCheck(**{**fields, **change})


# --------------------------------------------------------------------- suite config


def test_suite_may_not_set_the_gate_threshold_and_old_suites_get_the_default(
    tmp_path: Path,
) -> None:
    import yaml

    raw = yaml.safe_load(Path(load_config().path).read_text())
    assert raw["checks"]["answer_format"] == {"severity": "error", "enabled": True}

    raw["checks"]["answer_format"]["max_fraction"] = 0.5
    cfg = tmp_path / "loose.yaml"
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ValueError, match=r"checks\.answer_format.*min_share"):
        load_config(cfg)

    del raw["checks"]["answer_format"]  # a suite from before v4
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(raw), encoding="utf-8")
    af = load_config(old).checks.answer_format
    assert af.severity == "error" and af.enabled
