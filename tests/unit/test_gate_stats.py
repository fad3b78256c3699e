"""Gates with error bars (issue 12): the interval formulas against published and library
values, the three verdicts, configuration errors for gates a suite can never pass, and
simulated candidates (equal, worse on one slice, over-confident in the wrong places) that
the gates must treat as declared: equal ones wrongly failed no more often than 1 - power,
and never decisively failed more often than the one-sided error rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest

from tests.gate_results import result
from tests.tasks import triage
from tuneship import stats
from tuneship.evaluate import SuiteError, SuiteResult, apply_gates, load_cases, load_suite, score


def test_intervals_match_the_published_example_and_scipy():
    # Fagerland, Lydersen & Laake, ch. 8 (Cavo et al. 2012): 59, 6 / 16, 80 -> -0.0621 (-0.1186 to -0.0046)
    d = stats.newcombe_paired(59, 6, 16, 80)
    assert (round(d.diff, 4), round(d.low, 4), round(d.high, 4)) == (-0.0621, -0.1186, -0.0046)
    assert d.p_value == pytest.approx(binomtest(6, 22, 0.5).pvalue)  # McNemar exact: the discordant pairs
    for k, n in ((0, 10), (37, 40), (40, 40), (3, 7)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert stats.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    # every interval holds its own estimate, to the last bit (0/3's lower bound once came out 1e-17)
    assert all(stats.wilson(k, n)[0] <= k / n <= stats.wilson(k, n)[1] for n in range(1, 120) for k in range(n + 1))
    # no discordant pair is not certainty: the interval stays open (a bootstrap's would be [0, 0])
    same = stats.paired_diff([True] * 40, [True] * 40)
    assert same.diff == 0 and same.low < -0.08 and same.high > 0.08


def test_exact_power_is_what_simulation_measures():
    """The configuration check's power (exact, over every outcome table) against 4000
    simulated equal candidates scored with the same interval."""
    rng = np.random.default_rng(12)
    n, margin, rate, disc = 40, 0.20, 0.9, 0.1
    exact = stats.noninferiority_power(n, margin, rate=rate, discordance=disc)
    draws = rng.multinomial(n, [rate - disc / 2, disc / 2, disc / 2, 1 - rate - disc / 2], size=4000)
    shown = np.mean([stats.newcombe_paired(*map(int, t)).low >= -margin for t in draws])
    assert abs(shown - exact) < 0.025, (shown, exact)
    assert stats.detectable_margin(n, rate=rate, discordance=disc) == pytest.approx(0.170, abs=0.002)
    assert stats.noninferiority_power(n, stats.detectable_margin(n, rate=rate, discordance=disc),
                                      rate=rate, discordance=disc) >= 0.8


def _triage_like(rng: np.random.Generator, n: int = 40, rate: float = 0.9, disc: float = 0.1,
                 shift: float = 0.0) -> tuple[SuiteResult, SuiteResult]:
    """A champion and a candidate on the same n cases: they disagree on a share `disc`, and the
    candidate is `shift` better (negative: worse) in expectation."""
    ref = rng.random(n) < rate
    u = rng.random(n)
    cand = ref.copy()
    cand[ref & (u < (disc / 2 - shift / 2) / rate)] = False
    cand[~ref & (u < (disc / 2 + shift / 2) / (1 - rate))] = True
    fmt = [True] * n
    return (result({"category_accuracy": cand.tolist(), "priority_accuracy": cand.tolist(), "format_rate": fmt}),
            result({"category_accuracy": ref.tolist(), "priority_accuracy": ref.tolist(), "format_rate": fmt}))


def test_equal_candidates_are_failed_no_more_often_than_declared():
    """300 seeds of a candidate exactly as good as its champion, through the shipped triage
    suite's gates: wrongly refused (fail or inconclusive) at most 1 - power of the time, plus
    Monte Carlo slack; decisively failed at most alpha / 2."""
    suite = load_suite("triage")
    rng = np.random.default_rng(7)
    verdicts = []
    for _ in range(300):
        cand, ref = _triage_like(rng)
        report = apply_gates(suite, cand, ref, "champion")
        verdicts.append({g.verdict for g in report.gates if g.rule == "vs reference"})
    refused = np.mean([v != {"pass"} for v in verdicts])
    failed = np.mean(["fail" in v for v in verdicts])
    print(f"equal candidates: refused {refused:.3f}, decisively failed {failed:.3f} (300 seeds)")
    # two margins on the same outcomes here, so the declared 0.2 holds per gate and jointly
    assert refused <= 1 - suite.statistics.power + 0.05
    assert failed <= (1 - suite.statistics.confidence) / 2


def test_a_candidate_worse_on_one_slice_is_refused_with_the_reason():
    """The champion is right on all 8 billing tickets; the candidate gets every one wrong and
    keeps the rest: 8 of 40 worse is refused on category accuracy, by name."""
    suite = load_suite("triage")
    ref_cat = [True] * 36 + [False] * 4
    cand_cat = [False] * 8 + ref_cat[8:]  # the billing slice, first 8 cases
    same = [True] * 40
    report = apply_gates(suite, result({"category_accuracy": cand_cat, "priority_accuracy": same, "format_rate": same}),
                         result({"category_accuracy": ref_cat, "priority_accuracy": same, "format_rate": same}),
                         "champion v4")
    assert not report.passed
    [gate] = [g for g in report.gates if g.rule == "vs reference" and not g.passed]
    assert gate.metric == "category_accuracy"
    assert gate.verdict in ("fail", "inconclusive") and gate.diff["worse"] == 8
    assert "category_accuracy vs champion v4: difference -0.200" in report.summary()
    # far worse (20 of 40 lost) is a decisive fail, not merely inconclusive
    cand_cat = [False] * 20 + ref_cat[20:]
    report = apply_gates(suite, result({"category_accuracy": cand_cat, "priority_accuracy": same, "format_rate": same}),
                         result({"category_accuracy": ref_cat, "priority_accuracy": same, "format_rate": same}))
    assert [g.verdict for g in report.gates if g.metric == "category_accuracy" and g.rule == "vs reference"] == ["fail"]


def test_three_verdicts_on_a_floor_and_a_ceiling(tmp_path: Path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({
        "name": "g", "version": 1, "decline": {"phrases": ["cannot help"]},
        "cases": {"source": "dataset_eval_split", "limit": 40},
        "metrics": [{"name": "acc", "kind": "parse_rate"}, {"name": "wrong", "kind": "wrongly_declined"}],
        "gates": [{"metric": "acc", "min": 0.7}, {"metric": "wrong", "max": 0.2}]}))
    suite = load_suite(path)

    def verdicts(acc: int, wrong: int) -> list[str]:
        res = result({"acc": [True] * acc + [False] * (40 - acc), "wrong": [True] * wrong + [False] * (40 - wrong)},
                     "g")
        return [g.verdict for g in apply_gates(suite, res, None).gates]

    assert verdicts(36, 1) == ["pass", "pass"]  # 0.90 [0.77, 0.96]; 0.025 [0.004, 0.13]
    assert verdicts(29, 5) == ["inconclusive", "inconclusive"]  # 0.725 [0.57, 0.84]; 0.125 [0.05, 0.26]
    assert verdicts(20, 16) == ["fail", "fail"]  # 0.50 [0.35, 0.65]; 0.40 [0.26, 0.55]
    report = apply_gates(suite, result({"acc": [True] * 29 + [False] * 11, "wrong": [False] * 40}, "g"), None)
    assert not report.passed and "inconclusive counts as fail" in report.summary()


def test_gates_a_suite_can_never_pass_are_configuration_errors(tmp_path: Path):
    def suite(gates: list[dict], limit: int = 40) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({
            "name": "c", "version": 1, "cases": {"source": "dataset_eval_split", "limit": limit},
            "metrics": [{"name": "acc", "kind": "parse_rate"}], "gates": gates}))
        return path

    with pytest.raises(SuiteError, match=r"gates\.0 on 'acc': with 40 cases even a perfect score's 95% lower bound "
                                         r"is 0\.912, below the floor 0\.95: .* at least 73 cases"):
        load_suite(suite([{"metric": "acc", "min": 0.95}]))
    with pytest.raises(SuiteError, match=r"40 cases show non-inferiority at 0\.170 at best .* more than the margin "
                                         r"0\.05: widen the margin or score more cases \(about 314"):
        load_suite(suite([{"metric": "acc", "max_regression": 0.05}]))
    assert load_suite(suite([{"metric": "acc", "max_regression": 0.05}], limit=400))
    # a dataset suite is checked again on the cases actually scored: 12 is too few for this floor
    ok = load_suite(suite([{"metric": "acc", "min": 0.8}]))
    report = apply_gates(ok, result({"acc": [True] * 12}, "c"), None)
    [gate] = report.gates
    assert not report.passed and gate.verdict == "unreachable"
    assert "configuration error: with 12 cases even a perfect score's 95% lower bound is 0.758" in gate.reason


def test_a_missing_expectation_is_never_a_match():
    """v3 (another domain's data) once scored category accuracy 1.000: its cases had no
    expected category and its answers parsed to none, and None == None counted."""
    suite = load_suite("triage-smoke")
    cases = [c.model_copy(update={"expected": {}}) for c in load_cases(suite)]
    cases[0] = load_cases(suite)[0]
    garbage = ["I am sorry, I cannot help."] * len(cases)
    res = score(suite, cases, garbage, lambda text: {"category": None, "priority": None})
    assert res.outcomes["category_accuracy"] == [False] + [None] * (len(cases) - 1)
    assert res.metrics["category_accuracy"] == 0.0
    with pytest.raises(SuiteError, match="no case has an expected `category`"):
        score(suite, cases[1:], garbage[1:], lambda text: {"category": None, "priority": None})


def test_gates_absolute_and_regression():
    """Floors on the Wilson lower bound, margins on the paired difference: a candidate 6
    cases worse than its champion on 40 is refused (the difference's upper bound is below
    the margin); one that keeps the champion's answers passes."""
    suite = load_suite("triage")
    ref = result({"category_accuracy": [True] * 38 + [False] * 2, "priority_accuracy": [True] * 40,
                            "format_rate": [True] * 40})
    same = result({k: list(v) for k, v in ref.outcomes.items()})
    report = apply_gates(suite, same, ref, "champion v1")
    assert report.passed, report.summary()
    worse = result({**same.outcomes, "priority_accuracy": [False] * 16 + [True] * 24})
    report = apply_gates(suite, worse, ref, "champion v1")
    assert not report.passed
    [failed] = [g for g in report.gates if not g.passed]
    assert (failed.metric, failed.verdict, failed.reference) == ("priority_accuracy", "fail", 1.0)
    assert "FAIL priority_accuracy vs champion v1: difference -0.400 [" in report.summary()
    assert "must stay above -0.200" in report.summary() and "0 better, 16 worse" in report.summary()
    low = result({**same.outcomes, "category_accuracy": [True] * 20 + [False] * 20})
    text = apply_gates(suite, low, ref).summary()
    assert "FAIL category_accuracy >= 0.700: 0.500 [0.352, 0.648] (n=40)" in text


def test_regression_gate_without_reference_is_refused_not_passed(tmp_path: Path):
    """A smoke suite has no reference model: a `max_regression` gate there used to be read as
    `min 0` and always pass. Now the suite is refused with the gate named."""
    gate_suite = load_suite("triage")
    with pytest.raises(SuiteError, match="'category_accuracy' is `max_regression`, but no reference"):
        apply_gates(gate_suite, result({"category_accuracy": [True] * 40, "priority_accuracy": [True] * 40,
                                              "format_rate": [True] * 40}), None)
    smoke = load_suite("triage-smoke")
    cases = load_cases(smoke)
    half = [f" category={c.expected['category'] if i % 2 else 'nope'} priority=low" for i, c in enumerate(cases)]
    report = apply_gates(smoke, score(smoke, cases, half, triage().parse_answer), None)
    assert not report.passed  # 2 of 5 right is below the smoke floor of 0.6
    assert "FAIL category_accuracy >= 0.600: 0.400 (n=5)" in report.summary()


def test_a_candidate_whose_answer_flips_with_the_name_is_refused(tmp_path: Path):
    """30 counterfactual groups (the same ticket from differently named customers): the
    champion's category flips in 1, the candidate's in 16. Both the ceiling and the margin
    against the champion refuse it, decisively; an equally steady candidate passes."""
    path = tmp_path / "fair.yaml"
    path.write_text(yaml.safe_dump({
        "name": "fair", "version": 1, "statistics": {"expected_rate": 0.9},
        "cases": {"source": "dataset_eval_split", "limit": 40, "counterfactuals": [
            {"prompt": f"Ticket {i}: this is {{name}}, my card was declined.\nTriage:", "slot": "name",
             "values": ["Emily", "Lakisha", "Jamal", "Wei"]} for i in range(30)]},
        "metrics": [{"name": "flips", "kind": "flip_rate", "field": "category"}],
        "gates": [{"metric": "flips", "max": 0.2}, {"metric": "flips", "max_regression": 0.25}]}))
    suite = load_suite(path)

    def flips(k: int) -> SuiteResult:
        # a group's outcome sits on its first variant; the other three variants are not cases
        per_group = [True] * k + [False] * (30 - k)
        return result({"flips": [x for f in per_group for x in (f, None, None, None)]}, "fair")

    report = apply_gates(suite, flips(16), flips(1), "champion v2")
    assert [(g.rule, g.verdict) for g in report.gates] == [("<=", "fail"), ("vs reference", "fail")], report.summary()
    text = report.summary()
    assert "FAIL flips vs champion v2: difference +0.500" in text and "must stay below +0.250" in text
    assert "0 better, 15 worse" in text  # a flip is a fault: more of them is worse
    assert apply_gates(suite, flips(1), flips(1), "champion v2").passed
    # 30 groups is what the file says: a ceiling of 0.1 is beyond them
    bad = yaml.safe_load(path.read_text())
    bad["gates"] = [{"metric": "flips", "max": 0.1}]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SuiteError, match=r"with 30 cases even a clean score's 95% upper bound is 0\.114"):
        load_suite(path)


def _kept_suite(tmp_path: Path, **gate) -> Path:
    path = tmp_path / "kept.yaml"
    path.write_text(yaml.safe_dump({
        "name": "kept", "version": 1, "cases": {"source": "dataset_eval_split", "limit": 40},
        "metrics": [{"name": "acc", "kind": "field_exact_match", "field": "category"}],
        "gates": [{"metric": "acc", "max_regression": 0.25}, {"metric": "acc", **gate}]}))
    return path


def test_min_kept_catches_churn_the_net_difference_hides(tmp_path: Path):
    """The champion is right on 36 of 40. A candidate that loses 7 of them and wins the 4 the
    champion missed nets -0.075 (lower bound -0.24, inside a 0.25 margin), but keeps only 29 of
    36 (0.81, lower bound 0.65): `min_kept: 0.70` refuses it, naming what it lost. One that
    loses 1 passes."""
    suite = load_suite(_kept_suite(tmp_path, min_kept=0.70))
    ref = [True] * 36 + [False] * 4
    churn = [False] * 7 + [True] * 29 + [True] * 4
    report = apply_gates(suite, result({"acc": churn}, "kept"), result({"acc": ref}, "kept"), "champion v3")
    net, kept = report.gates
    assert net.passed and net.diff["diff"] == pytest.approx(-0.075) and net.diff["low"] > -0.25
    assert not kept.passed and kept.n == 36 and kept.value == pytest.approx(29 / 36)
    assert kept.low == pytest.approx(stats.wilson(29, 36)[0]) and kept.low < 0.70 < kept.high
    assert "kept 29 of the 36 cases champion v3 got right" in report.summary()
    steady = [False] + [True] * 35 + [False] * 4
    assert apply_gates(suite, result({"acc": steady}, "kept"), result({"acc": ref}, "kept"), "champion v3").passed
    # a base model right on nothing leaves nothing to keep: passed, and said so
    base = apply_gates(suite, result({"acc": ref}, "kept"), result({"acc": [False] * 40}, "kept"), "base model")
    assert base.gates[1].passed and "base model got no case right: nothing to keep" in base.summary()


def test_min_kept_is_checked_like_a_floor(tmp_path: Path):
    with pytest.raises(SuiteError, match="below the floor 0.95"):
        load_suite(_kept_suite(tmp_path, min_kept=0.95))
    with pytest.raises(SuiteError, match="exactly one of"):
        load_suite(_kept_suite(tmp_path, min_kept=0.7, min=0.5))
    # it counts the reference's right answers: no reference, no gate
    suite = load_suite(_kept_suite(tmp_path, min_kept=0.7))
    with pytest.raises(SuiteError, match="`max_regression`, but no reference"):
        apply_gates(suite, result({"acc": [True] * 40}, "kept"), None)
