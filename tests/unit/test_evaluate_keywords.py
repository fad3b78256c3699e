"""Free-text suite checks: keywords, forbidden strings, declines (both ways), chat prompts.

Completions are written by hand, so each figure below is what the metric must say about them;
no model runs except the tiny one that shows chat prompts are encoded as training encodes them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from tuneship.evaluate import (
    SuiteError,
    apply_gates,
    load_cases,
    load_suite,
    run_suite,
    score,
)

REPO = Path(__file__).resolve().parents[2]
DECLINE = "Sorry, I can only help with questions about your orders, shipping, returns and accounts at this store."


def _faq_task():
    key = "test_evaluate_keywords_faq_task"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "include" / "tasks" / "faq_task.py")
        assert spec and spec.loader
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def _suite(tmp_path: Path, body: dict, name: str = "s.yaml") -> Path:
    doc = {"name": "s", "version": 1, **body}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


CASES = [
    {"prompt": _user("How long does shipping take?"), "keywords": ["3-5 business days"]},
    {"prompt": _user("Which payment methods?"), "keywords": ["Visa", "PayPal"]},
    {"prompt": _user("Weather in Berlin?"), "should_decline": True, "forbidden": ["sunny"]},
    {"prompt": _user("Reverse a list in Python?"), "should_decline": True},
]
METRICS = [
    {"name": "facts", "kind": "keywords"},
    {"name": "any_fact", "kind": "keywords", "match": "any"},
    {"name": "clean", "kind": "must_not_contain", "forbidden": ["<|im_end|>"]},
    {"name": "declined", "kind": "declined"},
    {"name": "wrongly_declined", "kind": "wrongly_declined"},
]
GATES = [{"metric": "facts", "min": 0.5}, {"metric": "declined", "min": 1.0},
         {"metric": "wrongly_declined", "max": 0.0}, {"metric": "clean", "min": 1.0}]


@pytest.fixture
def suite(tmp_path: Path):
    return load_suite(_suite(tmp_path, {"role": "smoke", "decline": {"phrases": ["I can only help with"]},
                                        "cases": {"source": "inline", "items": CASES},
                                        "metrics": METRICS, "gates": GATES}))


def test_each_kind_scores_hand_written_answers(suite):
    cases = load_cases(suite)
    outs = [
        "Standard SHIPPING takes 3-5 Business Days.",  # keywords match case-insensitively
        "We accept Visa and Mastercard.",  # one of two keywords: fails `all`, passes `any`
        "It will be sunny. " + DECLINE,  # declined, but says a forbidden word
        "Use reversed(my_list).<|im_end|>",  # answered an out-of-scope question; leaked a token
    ]
    m = score(suite, cases, outs).metrics
    assert m == {"facts": 0.5, "any_fact": 1.0, "clean": 0.5, "declined": 0.5, "wrongly_declined": 0.0}
    perfect = ["Standard shipping takes 3-5 business days.", "We accept Visa, Mastercard, PayPal.", DECLINE, DECLINE]
    res = score(suite, cases, perfect)
    assert res.metrics == {"facts": 1.0, "any_fact": 1.0, "clean": 1.0, "declined": 1.0, "wrongly_declined": 0.0}
    assert apply_gates(suite, res, None).passed
    # a keyword-only suite needs no parser; samples carry the messages and the decline verdicts
    assert res.samples[2] == {"prompt": _user("Weather in Berlin?"), "expected": {}, "completion": DECLINE,
                              "parsed": {}, "should_decline": True, "declined": True}


def test_a_model_that_declines_everything_fails(suite):
    cases = load_cases(suite)
    res = score(suite, cases, [DECLINE] * len(cases))
    assert res.metrics["declined"] == 1.0 and res.metrics["wrongly_declined"] == 1.0
    report = apply_gates(suite, res, None)
    assert not report.passed
    assert {g.metric for g in report.gates if not g.passed} == {"facts", "wrongly_declined"}
    assert "FAIL wrongly_declined <= 0.000: 1.000" in report.summary()


def test_decline_everything_fails_the_faq_suites(tmp_path: Path):
    """The shipped faq suites, on the faq task's own eval split and smoke cases: the reference
    answers pass every gate, a model that only declines fails them."""
    faq = _faq_task()
    gate = load_suite("faq")
    n = gate.cases.limit  # the suite scores the first `limit` cases of the split
    faq.write_dataset(tmp_path, n_train=100, n_eval=n, seed=5)
    cases = load_cases(gate, tmp_path, faq.parse_answer)
    assert len(cases) == n and sum(c.should_decline for c in cases) == round(n * faq.DECLINE_SHARE)
    assert all(c.expected["topic"] == "declined" for c in cases if c.should_decline)
    reference = [json.loads(line)["messages"][-1]["content"] for line in (tmp_path / "eval.jsonl").open()]
    same_likelihood = [-1.0] * len(cases)  # the answers are written by hand: no model to ask
    sure = [[-0.05]] * len(cases)  # and every answer given with probability 0.95
    right = score(gate, cases, reference, faq.parse_answer, same_likelihood, None, sure)
    assert {k: v for k, v in right.metrics.items() if "ece" not in k and "brier" not in k} == {
        "topic_accuracy": 1.0, "format_rate": 1.0, "declined_when_should": 1.0, "wrongly_declined": 0.0,
        "answer_loglik": -1.0}
    assert right.metrics["answer_ece"] == pytest.approx(1 - 0.951, abs=1e-3)
    assert apply_gates(gate, right, right, "itself").passed
    refuser = score(gate, cases, [faq.DECLINE] * len(cases), faq.parse_answer, same_likelihood, None, sure)
    report = apply_gates(gate, refuser, right, "reference")
    assert not report.passed
    # wrong on every answerable question, and as sure of those answers as of the right ones
    assert {g.metric for g in report.gates if not g.passed} == {"topic_accuracy", "wrongly_declined", "answer_ece",
                                                                "answer_brier"}

    smoke = load_suite("faq-smoke")
    smoke_cases = load_cases(smoke)
    facts = [answer for answer, _keys in faq.FACTS.values()]
    answers = [faq.DECLINE if c.should_decline else
               next(a for a in facts if all(k.lower() in a.lower() for k in c.keywords)) for c in smoke_cases]
    assert apply_gates(smoke, score(smoke, smoke_cases, answers), None).passed
    assert not apply_gates(smoke, score(smoke, smoke_cases, [faq.DECLINE] * len(smoke_cases)), None).passed


def test_regex_detector(tmp_path: Path):
    path = _suite(tmp_path, {
        "decline": {"regex": r"\b(can(no|')t|unable to) help\b"},
        "cases": {"source": "inline", "items": CASES},
        "metrics": [{"name": "declined", "kind": "declined"}, {"name": "wrong", "kind": "wrongly_declined"}],
    })
    suite = load_suite(path)
    cases = load_cases(suite)
    res = score(suite, cases, ["I CANNOT HELP with that.", "We accept Visa.", "Unable to help, sorry.", "Sure!"])
    assert res.metrics == {"declined": 0.5, "wrong": 0.5}
    assert res.outcomes == {"declined": [None, None, True, False], "wrong": [True, False, None, None]}
    # lower-is-better margins against a reference: tests/unit/test_gate_stats.py


@pytest.mark.parametrize(("body", "needles"), [
    ({"metrics": [{"name": "d", "kind": "declined"}]}, ["metrics.0 ('d')", "needs the suite's `decline` detector"]),
    ({"decline": {"regex": "(unclosed"}, "metrics": [{"name": "d", "kind": "declined"}]},
     ["decline", "not a valid regular expression"]),
    ({"decline": {"phrases": [""]}, "metrics": [{"name": "d", "kind": "declined"}]}, ["decline", "empty string"]),
    ({"decline": {}, "metrics": [{"name": "d", "kind": "declined"}]}, ["decline", "`phrases`"]),
    ({"decline": {"phrases": ["x"]}, "metrics": [{"name": "w", "kind": "wrongly_declined"}],
      "gates": [{"metric": "w", "min": 0.9}]}, ["gates.0 on 'w'", "lower is better", "use `max`"]),
    ({"metrics": [{"name": "k", "kind": "keywords"}], "gates": [{"metric": "k", "max": 0.9}]},
     ["gates.0 on 'k'", "higher is better", "use `min`"]),
    ({"metrics": [{"name": "k", "kind": "parse_rate", "match": "any"}]}, ["metrics.0", "`match` is for kind keywords"]),
    ({"metrics": [{"name": "k", "kind": "keywords", "forbidden": ["x"]}]}, ["metrics.0", "`forbidden` is for"]),
    ({"metrics": [{"name": "k", "kind": "keywords", "mtach": "any"}]}, ["metrics.0.mtach", "Extra inputs"]),
])
def test_schema_errors_name_the_file_and_the_field(tmp_path: Path, body: dict, needles: list[str]):
    items = [{"prompt": _user("hi"), "keywords": ["hello"]}, {"prompt": "plain", "keywords": ["x"]}]
    path = _suite(tmp_path, {"cases": {"source": "inline", "items": items}, **body})
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize(("items", "metric", "needles"), [
    ([{"prompt": "q", "expected": {"topic": "x"}}], {"name": "k", "kind": "keywords"},
     ["metrics.0 ('k')", "no case lists `keywords`"]),
    ([{"prompt": "q"}], {"name": "n", "kind": "must_not_contain"}, ["no case lists `forbidden`"]),
    ([{"prompt": "q"}], {"name": "d", "kind": "declined"}, ["no case has `should_decline: true`"]),
    ([{"prompt": "q", "should_decline": True}], {"name": "w", "kind": "wrongly_declined"},
     ["every case has `should_decline: true`"]),
    ([{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "keywords": ["a"]}],
     {"name": "k", "kind": "keywords"}, ["cases.items.0.prompt", "ending with a `user` message"]),
    ([{"prompt": [{"role": "robot", "content": "q"}], "keywords": ["a"]}],
     {"name": "k", "kind": "keywords"}, ["cases.items.0.prompt", "role"]),
])
def test_metrics_with_nothing_to_score_are_refused(tmp_path: Path, items: list, metric: dict, needles: list[str]):
    path = _suite(tmp_path, {"decline": {"phrases": ["sorry"]}, "cases": {"source": "inline", "items": items},
                             "metrics": [metric]})
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert str(err.value).startswith(str(path))
    for needle in needles:
        assert needle in str(err.value)


def test_should_decline_needs_a_detector(tmp_path: Path):
    path = _suite(tmp_path, {"cases": {"source": "inline", "items": [{"prompt": "q", "should_decline": True,
                                                                       "keywords": ["a"]}]},
                             "metrics": [{"name": "k", "kind": "keywords"}]})
    with pytest.raises(SuiteError, match=r"cases\.items\.0\.should_decline needs the suite's `decline` detector"):
        load_suite(path)


def test_dataset_split_cases_from_chat_rows_and_the_callers_parser(tmp_path: Path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ship time?"},
                      {"role": "assistant", "content": "Standard shipping takes 3-5 business days."}]},
        {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": DECLINE}]},
        {"prompt": "Plain prompt", "completion": " We accept Visa, Mastercard, PayPal and gift cards."},
    ]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = load_suite(_suite(tmp_path, {
        "decline": {"phrases": ["I can only help with"]}, "cases": {"source": "dataset_eval_split"},
        "metrics": [{"name": "topic", "kind": "field_exact_match", "field": "topic"},
                    {"name": "declined", "kind": "declined"}, {"name": "wrong", "kind": "wrongly_declined"}],
    }))
    with pytest.raises(SuiteError, match="has no `parser`: score it with a task's parser"):
        load_cases(suite, tmp_path)
    parse = _faq_task().parse_answer
    cases = load_cases(suite, tmp_path, parse)
    assert [c.expected for c in cases] == [{"topic": "shipping"}, {"topic": "declined"}, {"topic": "payment"}]
    assert [c.should_decline for c in cases] == [False, True, False]
    assert cases[0].prompt_input() == rows[0]["messages"][:2] and cases[2].prompt_input() == "Plain prompt"

    seen: list = []

    def generate(prompts: list, max_new: int) -> list[str]:
        seen.extend(prompts)
        return ["Standard shipping takes 3-5 business days.", DECLINE, DECLINE]

    res = run_suite(suite, generate, cases, parse)
    assert seen == [rows[0]["messages"][:2], rows[1]["messages"][:1], "Plain prompt"]
    assert res.metrics == {"topic": 2 / 3, "declined": 1.0, "wrong": 0.5}

    (tmp_path / "eval.jsonl").write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(SuiteError, match=r"eval\.jsonl:1: a chat row's `messages` must end with the assistant"):
        load_cases(suite, tmp_path, parse)


def test_shipped_triage_suites_still_score_with_their_own_parser():
    from tests.tasks import triage

    smoke = load_suite("triage-smoke")
    cases = load_cases(smoke)
    res = score(smoke, cases, [f" category={c.expected['category']} priority=low" for c in cases],
                triage().parse_answer)
    assert res.metrics == {"format_rate": 1.0, "category_accuracy": 1.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ml_fixtures import build_tiny

    from tuneship.basemodel import load_base

    spec = {"corpus_docs": 120, "pretrain_steps": 3, "batch_size": 4, "seq_len": 32, "vocab_size": 400}
    out = build_tiny(tmp_path_factory.mktemp("tiny-chat"), seed=1, spec=spec, log=lambda m: None)
    return load_base(str(out))


def test_chat_prompts_are_encoded_as_training_encodes_them(tiny):
    """Eval feeds a chat prompt to the model as exactly the token ids training used for that
    row's prompt (the tokens before the labelled answer), so gates judge what was learned."""
    from tuneship.generate import generate, generate_ids, render_prompt
    from tuneship.train.trainer import encode_rows

    model, tok = tiny
    messages = _user("How long does shipping take?")
    row = {"messages": [*messages, {"role": "assistant", "content": "Standard shipping takes 3-5 business days."}]}
    (example,), _ = encode_rows([row], tok, 512)
    trained_prompt = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == -100]
    text, add_special = render_prompt(tok, messages)
    assert tok(text, add_special_tokens=add_special)["input_ids"] == trained_prompt
    assert generate_ids(model, tok, messages, 4)[1] == len(trained_prompt)
    # a plain string is a chat user message only when asked for; otherwise it is sent as is
    assert render_prompt(tok, "How long does shipping take?", "chat") == (text, add_special)
    assert render_prompt(tok, "Ticket: x\nTriage:") == ("Ticket: x\nTriage:", True)
    assert generate(model, tok, [messages], 6) == generate(model, tok, ["How long does shipping take?"], 6, "chat")
    with pytest.raises(ValueError, match="must end with a user message"):
        render_prompt(tok, row["messages"])
    with pytest.raises(ValueError, match="prompt_format must be"):
        render_prompt(tok, "x", "markdown")  # type: ignore[arg-type]
