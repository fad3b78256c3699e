"""Reference profiles and drift distances: identical ~0, shifted clearly above threshold."""

from __future__ import annotations

import json
import random

import pytest

from tuneship.profile import (
    LENGTH_BIN_EDGES,
    PSI_MODERATE,
    PSI_SIGNIFICANT,
    compare_profiles,
    length_bin,
    psi,
    text_profile,
)

WORDS = [
    "order",
    "refund",
    "shipping",
    "late",
    "broken",
    "invoice",
    "account",
    "login",
    "password",
    "return",
    "damaged",
    "charge",
    "card",
    "parcel",
    "tracking",
    "help",
]


def prompts(n: int, seed: int, lo: int = 8, hi: int = 20, words: list[str] = WORDS) -> list[str]:
    r = random.Random(seed)
    return [
        "Ticket: " + " ".join(r.choice(words) for _ in range(r.randint(lo, hi))) + "\nTriage:"
        for _ in range(n)
    ]


def test_psi_basics() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    assert psi([10, 10], [1, 1]) == pytest.approx(0.0)  # counts are normalised
    assert psi([0.5, 0.5], [0.9, 0.1]) > PSI_SIGNIFICANT
    assert 0 < psi([1.0, 0.0], [0.0, 1.0]) < float("inf")  # eps keeps it finite
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1.0])


def test_length_bins_are_fixed() -> None:
    assert length_bin(0) == 0
    assert length_bin(1) == 1
    assert length_bin(3) == 1
    assert length_bin(4) == 2
    assert length_bin(10**6) == len(LENGTH_BIN_EDGES) - 1


def test_text_profile_is_json_and_consistent() -> None:
    texts = prompts(500, 1)
    prof = text_profile(texts, top_k=5)
    assert json.loads(json.dumps(prof)) == prof
    assert prof["row_count"] == 500
    assert sum(prof["length"]["counts"]) == 500
    assert prof["length"]["bin_edges"] == list(LENGTH_BIN_EDGES)
    assert len(prof["vocabulary"]["counts"]) == 5
    assert "ticket" in prof["vocabulary"]["counts"]  # lower-cased, punctuation stripped


def test_identical_distribution_scores_near_zero() -> None:
    ref = text_profile(prompts(2000, 1))
    same = compare_profiles(ref, text_profile(prompts(2000, 1)))
    assert same["score"] == pytest.approx(0.0, abs=1e-9) and same["level"] == "stable"
    resample = compare_profiles(ref, text_profile(prompts(2000, 2)))
    assert resample["score"] < PSI_MODERATE and resample["level"] == "stable"
    assert resample["token_js_divergence"] < 0.01


def test_length_shift_is_detected() -> None:
    ref = text_profile(prompts(2000, 1))
    longer = compare_profiles(ref, text_profile(prompts(2000, 2, lo=60, hi=200)))
    assert longer["length_psi"] > PSI_SIGNIFICANT
    assert longer["score"] > PSI_SIGNIFICANT and longer["level"] == "significant"


def test_vocabulary_shift_is_detected_with_oov_share() -> None:
    ref = text_profile(prompts(2000, 1))
    other = ["kernel", "matrix", "gradient", "tensor", "lambda", "vector"]
    cur_texts = prompts(2000, 3, words=other)
    shifted = compare_profiles(ref, text_profile(cur_texts))
    assert shifted["token_psi"] > PSI_SIGNIFICANT
    assert shifted["token_js_divergence"] > 0.3
    assert shifted["current_oov_share"] > 0.5 and shifted["oov_share_delta"] > 0.5
    # raw texts are profiled against the reference vocabulary: same verdict
    from_texts = compare_profiles(ref, cur_texts)
    assert from_texts["token_psi"] == pytest.approx(shifted["token_psi"], rel=0.05)


def test_raw_texts_give_exact_counts_for_reference_tokens() -> None:
    ref = text_profile(prompts(1000, 1), top_k=len(WORDS) + 3)
    cur = prompts(1000, 4)
    assert compare_profiles(ref, cur)["score"] < PSI_MODERATE
