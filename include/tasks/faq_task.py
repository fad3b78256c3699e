"""Demo data and answer checks for the `faq` task: a chat support-FAQ assistant for an online store.

Loaded by file path from beside `faq.yaml` (the task loader resolves `faq_task:<function>`),
so it imports only the standard library and `tuneship.atomic`.

Each answerable question belongs to one FAQ topic and is answered with that topic's one
fact sentence; out-of-scope questions (weather, medical, legal, coding help, other
companies...) are answered with the decline sentence. Answers are one short sentence so a
135M-parameter model fine-tuned on a few hundred rows on CPU can learn them, and the key
fact words (`3-5 business days`, `30 days`...) decide the topic, so an answer with the
wrong fact parses to no topic at all.

    {"messages": [{"role": "user", "content": "How long does delivery take?"},
                  {"role": "assistant", "content": "Standard shipping takes 3-5 business days."}]}
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from tuneship import atomic

DECLINE = "Sorry, I can only help with questions about your orders, shipping, returns and accounts at this store."
# What marks an answer as a refusal (lower-case substrings); the faq eval suites list the same.
DECLINE_MARKERS: tuple[str, ...] = ("i can only help with",)
DECLINED = "declined"
DECLINE_SHARE = 0.18  # share of each split that is out of scope

# topic -> (the answer, the key fact words an answer must hold, lower-case)
FACTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "shipping": ("Standard shipping takes 3-5 business days.", ("3-5 business days",)),
    "returns": ("Returns are accepted within 30 days of delivery.", ("returns", "30 days")),
    "refunds": ("Refunds reach your original payment method within 5-7 business days.",
                ("refund", "5-7 business days")),
    "payment": ("We accept Visa, Mastercard, PayPal and gift cards.", ("visa", "paypal")),
    "password": ("Use the Forgot password link on the login page to reset your password.",
                 ("forgot password",)),
    "tracking": ("Your tracking link is in the shipping confirmation email.", ("tracking link",)),
    "cancellation": ("Orders can be cancelled within 1 hour of being placed.", ("cancel", "1 hour")),
}
TOPICS: tuple[str, ...] = tuple(FACTS)

# In-scope topics the training data never has: production traffic drifts towards them, and a
# later labelled batch (write_dataset(drift=...)) teaches them.
DRIFT_FACTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gift_wrap": ("Gift wrapping is free and can be added at checkout.", ("gift wrapping",)),
    "loyalty": ("You earn 1 loyalty point for every dollar you spend.", ("loyalty point",)),
    "pickup": ("Store pickup orders are ready within 2 hours.", ("store pickup", "2 hours")),
}
ALL_FACTS = {**FACTS, **DRIFT_FACTS}

_PRODUCTS = [
    "blue sneakers", "coffee maker", "winter jacket", "phone case", "desk lamp", "yoga mat",
    "headphones", "backpack", "water bottle", "office chair", "rain boots", "blender",
]

_QUESTIONS: dict[str, list[str]] = {
    "shipping": [
        "How long does shipping take?",
        "How many days until my {product} arrives with standard shipping?",
        "What is your normal delivery time?",
        "When will an order I place today be delivered?",
        "How fast is standard delivery for the {product}?",
        "How long do I wait for a package from your store?",
        "What are the shipping times for regular orders?",
        "If I buy the {product} now, how long is the delivery?",
    ],
    "returns": [
        "What is your return policy?",
        "How long do I have to return the {product}?",
        "Can I still send back an item I got two weeks ago?",
        "Is there a time limit for returns?",
        "Until when can I return the {product} if I do not like it?",
        "How many days do I have to send something back?",
        "Do you accept returns, and for how long?",
        "Can I return order {order} after a few weeks?",
    ],
    "refunds": [
        "When will I get my refund?",
        "How long does a refund take after you receive my return?",
        "Where does the money go when you refund the {product}?",
        "I returned order {order}, how soon is the money back?",
        "How many days until a refund shows up on my card?",
        "Will my refund go to my card or as store credit?",
        "How long until I see the refund for the {product}?",
        "When is the money for a returned item paid back?",
    ],
    "payment": [
        "Which payment methods do you accept?",
        "Can I pay with PayPal?",
        "Do you take credit cards?",
        "How can I pay for the {product}?",
        "Is it possible to pay with a gift card?",
        "What are the ways to pay at checkout?",
        "Can I use Mastercard for order {order}?",
        "Which cards can I pay with in your store?",
    ],
    "password": [
        "How do I reset my password?",
        "I forgot my password, what should I do?",
        "I cannot remember my login password.",
        "How can I change my account password?",
        "My password does not work anymore, how do I get a new one?",
        "Where do I reset the password for my account?",
        "I am locked out because I lost my password.",
        "How do I set a new password to log in?",
    ],
    "tracking": [
        "How do I track my order?",
        "Where can I see where my package is?",
        "How can I follow the delivery of the {product}?",
        "Where is the tracking number for order {order}?",
        "Is there a way to track my parcel?",
        "How do I find out where my {product} is right now?",
        "Where do I get the tracking information for my order?",
        "Can I see the delivery status of order {order}?",
    ],
    "cancellation": [
        "Can I cancel my order?",
        "How do I cancel order {order}?",
        "I ordered the {product} by mistake, can I still cancel?",
        "Is it too late to cancel an order I just placed?",
        "How long do I have to cancel an order?",
        "I changed my mind about the {product}, can I cancel the order?",
        "Can order {order} still be cancelled?",
        "What is the time limit for cancelling an order?",
    ],
}

_OUT_OF_SCOPE = [
    "What will the weather be like in {city} tomorrow?",
    "Is it going to rain in {city} this weekend?",
    "What medicine should I take for a headache?",
    "Can you tell me if these symptoms mean I have the flu?",
    "How much ibuprofen can I take in one day?",
    "Is it legal to break my apartment lease early?",
    "Can my landlord keep my deposit, what are my legal rights?",
    "How do I write a will without a lawyer?",
    "How do I reverse a list in Python?",
    "Can you fix this JavaScript error in my code?",
    "Write me a SQL query that joins two tables.",
    "What is the return policy at {company}?",
    "How long does shipping take with {company}?",
    "Can you help me reset my {company} password?",
    "Who won the football game last night?",
    "What is a good recipe for banana bread?",
    "Can you help me with my math homework?",
    "Which stocks should I buy this year?",
    "What is the capital of {country}?",
    "Can you recommend a hotel in {city}?",
]

_DRIFT_QUESTIONS: dict[str, list[str]] = {
    "gift_wrap": [
        "can you gift wrap the {product} for my sister",
        "do you do gift wrapping and what does it cost",
        "is there a gift wrap option at checkout for order {order}",
        "i want the {product} wrapped as a present, possible?",
    ],
    "loyalty": [
        "how do loyalty points work in your store",
        "how many points do i get for buying the {product}",
        "do i earn rewards points on order {order}",
        "is there a loyalty program and how do i collect points",
    ],
    "pickup": [
        "can i pick up the {product} in a store instead of delivery",
        "how soon is an in-store pickup order ready",
        "is click and collect available for order {order}",
        "when can i collect my order at the shop",
    ],
}

_GREETINGS = ["", "", "", "Hi, ", "Hello, ", "Hi there. ", "Hey, ", "Good morning, "]
_CLOSINGS = ["", "", "", " Thanks.", " Thank you!", " Thanks in advance.", " Cheers."]
_DRIFT_OPENERS = ["hey!!", "yo,", "ok so", "quick q:", "hiya", "hello hello,"]
_DRIFT_CLOSERS = ["thx", "ty!!", "pls let me know", "cheers :)", ""]
_CITIES = ["Berlin", "Chicago", "Lisbon", "Osaka", "Toronto", "Nairobi", "Madrid", "Denver"]
_COMPANIES = ["Amazon", "Walmart", "IKEA", "eBay", "Target", "Zara"]
_COUNTRIES = ["Peru", "Norway", "Kenya", "Vietnam", "Chile", "Austria"]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        product=rng.choice(_PRODUCTS),
        order=f"#{rng.randint(10000, 99999)}",
        city=rng.choice(_CITIES),
        company=rng.choice(_COMPANIES),
        country=rng.choice(_COUNTRIES),
    )


def _question(template: str, rng: random.Random) -> str:
    """One phrasing of a question: optional greeting and closing, sometimes all lower-case."""
    greeting, body = rng.choice(_GREETINGS), _fill(template, rng)
    if greeting.endswith(", ") and not body.startswith("I "):
        body = body[0].lower() + body[1:]
    text = (greeting + body + rng.choice(_CLOSINGS)).strip()
    return text.lower() if rng.random() < 0.15 else text


def _drift_question(topic: str, rng: random.Random) -> str:
    """A drifted question: a topic the training data never had, in a chattier style."""
    parts = [rng.choice(_DRIFT_OPENERS), _fill(rng.choice(_DRIFT_QUESTIONS[topic]), rng), rng.choice(_DRIFT_CLOSERS)]
    return " ".join(p for p in parts if p)


def _fold(text: str) -> str:
    """The key the validation's duplicate and leakage checks compare (case- and space-folded)."""
    return " ".join(text.lower().split())


def answer_for(topic: str) -> str:
    """The answer a question of `topic` gets (`declined`: the decline sentence)."""
    return DECLINE if topic == DECLINED else ALL_FACTS[topic][0]


def chat_row(question: str, answer: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _labels(n: int, topics: tuple[str, ...], rng: random.Random) -> list[str]:
    """Exactly round(n * DECLINE_SHARE) declines, the rest dealt round-robin over `topics`
    (so every topic gets n/len(topics) +- 1), in a seeded random order."""
    n_decline = round(n * DECLINE_SHARE)
    labels = [DECLINED] * n_decline + [topics[i % len(topics)] for i in range(n - n_decline)]
    rng.shuffle(labels)
    return labels


def _rows(labels: list[str], rng: random.Random, seen: set[str], drift_rows: bool = False) -> list[dict]:
    rows = []
    for label in labels:
        for _ in range(500):
            if drift_rows:
                question = _drift_question(label, rng)
            elif label == DECLINED:
                question = _question(rng.choice(_OUT_OF_SCOPE), rng)
            else:
                question = _question(rng.choice(_QUESTIONS[label]), rng)
            if _fold(question) not in seen:
                break
        else:
            raise RuntimeError(f"could not generate another distinct {label!r} question; lower n_train/n_eval")
        seen.add(_fold(question))
        rows.append(chat_row(question, answer_for(label)))
    return rows


def examples(n: int, seed: int, seen: set[str] | None = None) -> list[dict]:
    """n chat rows with distinct (case/space-folded) questions."""
    rng = random.Random(f"faq-{seed}")
    return _rows(_labels(n, TOPICS, rng), rng, set() if seen is None else seen)


def write_dataset(
    out_dir: str | os.PathLike[str],
    n_train: int = 400,
    n_eval: int = 80,
    seed: int = 0,
    drift: float = 0.0,
) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl (chat rows); no eval question appears in train.

    `drift` > 0 replaces that share of each split with labelled questions on the drifted
    topics (gift wrapping, loyalty points, store pickup): the batch a support team sends
    once those questions show up in production."""
    if n_train <= 0 or n_eval < 0:
        raise ValueError(f"n_train must be > 0 and n_eval >= 0 (got {n_train}, {n_eval})")
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be within [0, 1], got {drift}")
    rng = random.Random(f"faq-{seed}")
    seen: set[str] = set()
    splits = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        n_drift = round(n * drift)
        rows = _rows(_labels(n - n_drift, TOPICS, rng), rng, seen)
        drift_labels = [tuple(DRIFT_FACTS)[i % len(DRIFT_FACTS)] for i in range(n_drift)]
        rows += _rows(drift_labels, rng, seen, drift_rows=True)
        rng.shuffle(rows)
        splits[split] = rows
    out = Path(out_dir)
    paths = {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    for split, path in paths.items():
        atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in splits[split]))
    return paths


def parse_answer(text: str) -> dict[str, str | None]:
    """The topic an answer states, by its key fact words: a topic name, `declined` for the
    decline sentence, or None (wrong or missing fact, or facts of several topics at once)."""
    low = (text or "").lower()
    declined = any(marker in low for marker in DECLINE_MARKERS)
    hits = [topic for topic, (_, keys) in ALL_FACTS.items() if all(k in low for k in keys)]
    if declined and not hits:
        return {"topic": DECLINED}
    if len(hits) == 1 and not declined:
        return {"topic": hits[0]}
    return {"topic": None}


def answer_conforms(text: str) -> bool:
    """A training answer the task can use: one line, short (at most 30 words), one topic or the decline."""
    text = (text or "").strip()
    return bool(text) and "\n" not in text and len(text.split()) <= 30 and parse_answer(text)["topic"] is not None


def traffic_prompts(n: int, seed: int, drift: float = 0.0) -> list[str]:
    """Production-like user messages; a `drift` share asks about topics training never had
    (gift wrapping, loyalty points, store pickup) in a chattier lower-case style."""
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be within [0, 1], got {drift}")
    rng = random.Random(f"faq-traffic-{seed}")
    n_drift = round(n * drift)
    drifted = set(rng.sample(range(n), k=n_drift)) if n_drift else set()
    prompts = []
    for i in range(n):
        if i in drifted:
            prompts.append(_drift_question(rng.choice(tuple(DRIFT_FACTS)), rng))
        elif rng.random() < DECLINE_SHARE:
            prompts.append(_question(rng.choice(_OUT_OF_SCOPE), rng))
        else:
            prompts.append(_question(rng.choice(_QUESTIONS[rng.choice(TOPICS)]), rng))
    return prompts
