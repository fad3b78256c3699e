"""Demo data: deterministic, held out, learnable from the text, drift measurable."""

from __future__ import annotations

import json
import re
from collections import Counter

from tests.tasks import triage

datagen = triage()
parse_triage = datagen.parse_answer


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = datagen.write_dataset(tmp_path / "a", n_train=80, n_eval=20, seed=3)
    b = datagen.write_dataset(tmp_path / "b", n_train=80, n_eval=20, seed=3)
    c = datagen.write_dataset(tmp_path / "c", n_train=80, n_eval=20, seed=4)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    assert a["eval"].read_bytes() == b["eval"].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    assert datagen.traffic_prompts(30, 1, drift=0.3) == datagen.traffic_prompts(30, 1, drift=0.3)
    assert datagen.pretrain_corpus(20, 1) == datagen.pretrain_corpus(20, 1)


def test_rows_have_contract_shape_and_eval_is_held_out(tmp_path):
    paths = datagen.write_dataset(tmp_path, n_train=600, n_eval=120, seed=0)
    train = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    evals = [json.loads(x) for x in paths["eval"].read_text().splitlines()]
    assert (len(train), len(evals)) == (600, 120)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    for r in train + evals:
        assert set(r) == {"prompt", "completion"}
        assert r["prompt"].startswith("Ticket: ") and r["prompt"].endswith("\nTriage:")
        assert re.fullmatch(r" category=[a-z]+ priority=(low|normal|high)", r["completion"])
        lab = parse_triage(r["completion"])
        assert lab["category"] in datagen.CATEGORIES and lab["priority"] in datagen.PRIORITIES
    # every class is represented, none dominates
    cats = Counter(parse_triage(r["completion"])["category"] for r in train)
    pris = Counter(parse_triage(r["completion"])["priority"] for r in train)
    assert set(cats) == set(datagen.CATEGORIES) and max(cats.values()) < 0.35 * len(train)
    assert set(pris) == set(datagen.PRIORITIES)


def test_labels_follow_the_text_not_the_template(tmp_path):
    """Priority is decided by urgency cues in the text: high rows carry one, low/normal don't."""
    rows = datagen.examples(400, seed=7)
    high_cues = ("urgent", "asap", "immediately", "right now", "charged twice")
    for r in rows:
        text = r["prompt"].lower()
        pri = parse_triage(r["completion"])["priority"]
        has_cue = any(c in text for c in high_cues)
        assert has_cue == (pri == "high"), r


def test_parse_triage():
    assert parse_triage(" category=billing priority=high") == {"category": "billing", "priority": "high"}
    assert parse_triage("category = returns  priority = low\n") == {"category": "returns", "priority": "low"}
    assert parse_triage(" category=weather priority=high") == {"category": None, "priority": "high"}
    assert parse_triage("no idea") == {"category": None, "priority": None}
    assert parse_triage("") == {"category": None, "priority": None}


def test_chat_shape():
    row = datagen.examples(1, seed=0)[0]
    chat = datagen.to_chat(row)
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    assert chat["messages"][1]["content"] == row["completion"].strip()


def test_drifted_traffic_is_measurably_different():
    clean = datagen.traffic_prompts(200, seed=0, drift=0.0)
    drifted = datagen.traffic_prompts(200, seed=0, drift=0.5)
    train_vocab = {w for r in datagen.examples(600, 0) for w in r["prompt"].lower().split()}

    def oov(prompts):
        words = [w for p in prompts for w in p.lower().split()]
        return sum(w not in train_vocab for w in words) / len(words)

    def mean_len(prompts):
        return sum(len(p) for p in prompts) / len(prompts)

    assert all(p.startswith("Ticket: ") and p.endswith("\nTriage:") for p in drifted)
    assert oov(drifted) > 2 * oov(clean) + 0.05
    assert mean_len(drifted) > 1.3 * mean_len(clean)
    n_shifted = sum(("subscription" in p or "gift" in p or "loyalty" in p or "membership" in p
                     or "referral" in p or "voucher" in p) for p in drifted)
    assert 80 <= n_shifted <= 100  # drift=0.5 of 200, exactly 100 drifted prompts


def test_pretrain_corpus_never_shows_the_answer_format():
    corpus = datagen.pretrain_corpus(2000, seed=0)
    assert len(corpus) == 2000
    assert not any("category=" in d or "priority=" in d or "Triage:" in d for d in corpus)
    assert any("billing" in d for d in corpus)  # same vocabulary as the task
