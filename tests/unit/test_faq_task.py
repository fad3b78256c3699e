"""The `faq` demo task: seeded chat data that the real validation accepts, balanced topics and
declines, a keyword answer parser that tells right, wrong and declined answers apart, and
traffic that drifts to topics training never had."""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

TASKS = Path(__file__).resolve().parents[2] / "include" / "tasks"


def _load(name: str) -> ModuleType:
    """Import a task module by file path, as the task loader does (it is not on sys.path)."""
    key = f"test_faq_task_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, TASKS / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


faq = _load("faq_task")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _qa(row: dict) -> tuple[str, str]:
    user, assistant = row["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    return user["content"], assistant["content"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faq-batch")
    faq.write_dataset(out, n_train=400, n_eval=80, seed=0)
    return out


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, batch: Path):
    faq.write_dataset(tmp_path / "again", n_train=400, n_eval=80, seed=0)
    faq.write_dataset(tmp_path / "other", n_train=400, n_eval=80, seed=1)
    for split in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "again" / split).read_bytes() == (batch / split).read_bytes()
        assert (tmp_path / "other" / split).read_bytes() != (batch / split).read_bytes()


def test_topics_balanced_and_decline_share_exact(batch: Path):
    for split, n in (("train", 400), ("eval", 80)):
        rows = _rows(batch / f"{split}.jsonl")
        assert len(rows) == n
        topics = collections.Counter(faq.parse_answer(_qa(r)[1])["topic"] for r in rows)
        assert topics.pop(faq.DECLINED) == round(n * faq.DECLINE_SHARE)
        assert set(topics) == set(faq.TOPICS)  # every answer parses to a base topic: no None, no drift
        assert max(topics.values()) - min(topics.values()) <= 1


def test_questions_distinct_and_eval_held_out(batch: Path):
    def fold(text: str) -> str:
        return " ".join(text.lower().split())

    train = [fold(_qa(r)[0]) for r in _rows(batch / "train.jsonl")]
    evals = [fold(_qa(r)[0]) for r in _rows(batch / "eval.jsonl")]
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)
    # several phrasings per topic, not one memorised question each
    by_topic = collections.defaultdict(set)
    for row in _rows(batch / "train.jsonl"):
        q, a = _qa(row)
        by_topic[faq.parse_answer(a)["topic"]].add(q)
    assert all(len(qs) >= 20 for qs in by_topic.values())


def test_answers_short_and_conforming(batch: Path):
    answers = [_qa(r)[1] for r in _rows(batch / "train.jsonl") + _rows(batch / "eval.jsonl")]
    assert all(faq.answer_conforms(a) for a in answers)
    assert max(len(a.split()) for a in answers) <= 20


def test_generated_batch_passes_the_real_validation(batch: Path, tmp_path: Path):
    from tuneship.data import validate_dataset

    report = validate_dataset(batch, workdir=tmp_path / "work", workers=0)
    assert report.accepted, report.summary()
    assert "schema chat" in report.summary()
    assert not report.failed_checks and not report.warnings, report.summary()
    assert "400 accepted" in report.summary() and "80 accepted" in report.summary()


@pytest.mark.parametrize(("answer", "topic"), [
    ("Standard shipping takes 3-5 business days.", "shipping"),
    ("standard SHIPPING takes 3-5 Business Days", "shipping"),
    ("Returns are accepted within 30 days of delivery.", "returns"),
    ("Refunds reach your original payment method within 5-7 business days.", "refunds"),
    ("We accept Visa, Mastercard, PayPal and gift cards.", "payment"),
    ("Use the Forgot password link on the login page to reset your password.", "password"),
    ("Your tracking link is in the shipping confirmation email.", "tracking"),
    ("Orders can be cancelled within 1 hour of being placed.", "cancellation"),
    ("Gift wrapping is free and can be added at checkout.", "gift_wrap"),
    (faq.DECLINE, faq.DECLINED),
    ("Sorry, I can only help with store questions.", faq.DECLINED),
])
def test_parse_answer_reads_the_topic_from_its_fact(answer: str, topic: str):
    assert faq.parse_answer(answer) == {"topic": topic}
    assert faq.answer_conforms(answer)


@pytest.mark.parametrize("answer", [
    "Standard shipping takes 7-10 business days.",  # wrong fact
    "Returns are accepted within 14 days of delivery.",  # wrong fact
    "We accept Visa.",  # half the fact
    "Shipping takes 3-5 business days and returns are accepted within 30 days.",  # two topics
    "Sorry, I can only help with orders. Standard shipping takes 3-5 business days.",  # declines and answers
    "I am not sure.",
    "",
])
def test_parse_answer_gives_no_topic_for_wrong_or_mixed_answers(answer: str):
    assert faq.parse_answer(answer) == {"topic": None}
    assert not faq.answer_conforms(answer)


def test_answer_check_refuses_long_or_multiline_answers():
    assert not faq.answer_conforms("Standard shipping takes 3-5 business days.\nAnything else?")
    assert not faq.answer_conforms("Standard shipping takes 3-5 business days. " + "really " * 30)


def test_drifted_batch_teaches_the_new_topics(tmp_path: Path):
    faq.write_dataset(tmp_path, n_train=200, n_eval=40, seed=2, drift=0.25)
    rows = _rows(tmp_path / "train.jsonl")
    topics = collections.Counter(faq.parse_answer(_qa(r)[1])["topic"] for r in rows)
    assert sum(topics[t] for t in faq.DRIFT_FACTS) == 50
    assert all(topics[t] >= 16 for t in faq.DRIFT_FACTS)
    with pytest.raises(ValueError, match="drift must be within"):
        faq.write_dataset(tmp_path, drift=1.5)


_DRIFT_WORDS = re.compile(r"gift wrap|wrapped|points|pick ?up|collect", re.IGNORECASE)


def test_traffic_is_seeded_and_drift_brings_unseen_topics(batch: Path):
    assert faq.traffic_prompts(50, 3) == faq.traffic_prompts(50, 3)
    assert faq.traffic_prompts(50, 3) != faq.traffic_prompts(50, 4)
    plain = faq.traffic_prompts(200, 3)
    assert all(isinstance(p, str) and p for p in plain)
    assert not any(_DRIFT_WORDS.search(p) for p in plain)
    drifted = faq.traffic_prompts(200, 3, drift=0.4)
    assert sum(bool(_DRIFT_WORDS.search(p)) for p in drifted) == 80
    train_questions = " ".join(_qa(r)[0] for r in _rows(batch / "train.jsonl"))
    assert not _DRIFT_WORDS.search(train_questions), "drift topics must be new to the training data"
    with pytest.raises(ValueError, match="drift must be within"):
        faq.traffic_prompts(5, 0, drift=-0.1)


def test_task_file_names_functions_that_exist():
    """faq.yaml's shape, and each `faq_task:<fn>` it names is a function of faq_task.py
    (the task loader checks the same when it loads the file)."""
    task = yaml.safe_load((TASKS / "faq.yaml").read_text())
    assert task["name"] == "faq" and task["prompt_format"] == "chat"
    assert task["answers"]["fields"] == ["topic"]
    refs = [task["answers"]["parser"], task["answers"]["check"], task["demo"]["generator"], task["demo"]["traffic"]]
    for ref in refs:
        module, _, fn = ref.partition(":")
        assert module == "faq_task" and callable(getattr(faq, fn)), ref
    from tuneship.evaluate import load_suite

    for suite in [*task["eval"]["suites"], task["eval"]["smoke"]]:
        load_suite(suite)
