"""The reproduction studies' generators, evaluators and judgement (mtp_dist/repro/), and a smoke
run of the study machinery. The studies themselves are benchmarks (docs/reproductions.md)."""

from __future__ import annotations

import json
import random

import pytest

from mtp_dist.repro import polynomials as pl
from mtp_dist.repro import stories
from mtp_dist.repro.study import Claim, Study, Variant, summarise, update_docs
from mtp_dist.tokenizers import ByteTokenizer

X = pl.poly(0, 1)  # the polynomial x


def test_ring_operations_on_hand_worked_cases():
    one = pl.poly(1)
    assert pl.mul(pl.add(X, one), pl.add(X, one)) == pl.poly(1, 2, 1)  # (x+1)^2 = x^2+2x+1
    assert pl.mul(pl.poly(0, 0, 0, 0, 1), X) == pl.poly()  # x^4 * x = x^5 = 0
    assert pl.mul(pl.poly(0, 3), pl.poly(0, 5)) == pl.poly(0, 0, 1)  # 15x^2 = x^2 (mod 7)
    assert pl.neg(pl.poly(0, 3)) == pl.poly(0, 4)  # -3x = 4x
    assert pl.add(pl.poly(6, 6), pl.poly(1, 1)) == pl.poly()  # (6x+6)+(x+1) = 0
    x2 = pl.poly(0, 0, 1)
    assert pl.compose(x2, pl.add(X, one)) == pl.poly(1, 2, 1)  # (x^2) o (x+1)
    assert pl.compose(pl.add(X, one), x2) == pl.poly(1, 0, 1)  # (x+1) o (x^2) = x^2+1
    # (x^3) o (x^2) = x^6 = 0 in the ring; (2x^2+3) o (3x) = 18x^2+3 = 4x^2+3
    assert pl.compose(pl.poly(0, 0, 0, 1), x2) == pl.poly()
    assert pl.compose(pl.poly(3, 0, 2), pl.poly(0, 3)) == pl.poly(3, 0, 4)


def test_show_and_parse_round_trip_and_reject():
    assert pl.show(pl.poly(1, 6, 0, 0, 3)) == "3x^4+6x+1"
    assert pl.show(pl.poly()) == "0" and pl.show(pl.poly(0, 1)) == "x"
    rng = random.Random(0)
    for _ in range(200):
        p = pl.poly(*(rng.randrange(7) for _ in range(5)))
        assert pl.parse(pl.show(p)) == p
    assert pl.parse("1+3x^4+6x") == pl.poly(1, 6, 0, 0, 3)  # any order
    assert pl.parse("x+x") == pl.poly(0, 2)
    for bad in ("", "x^5", "3y", "-x", "x++1", "+"):
        assert pl.parse(bad) is None, bad


def test_dense_notation_round_trips_and_names_the_same_problems():
    assert pl.show(pl.poly(1, 6, 0, 0, 3), "dense") == "16003"
    assert pl.show(pl.poly(), "dense") == "00000"
    rng = random.Random(2)
    for _ in range(200):
        p = pl.poly(*(rng.randrange(7) for _ in range(5)))
        assert pl.parse(pl.show(p, "dense"), "dense") == p
    for bad in ("", "1600", "160030", "16007", "1600x", "x"):
        assert pl.parse(bad, "dense") is None, bad
    e = pl.Expr("*", (pl.Expr("leaf", value=pl.add(X, pl.poly(1))),
                      pl.Expr("neg", (pl.Expr("leaf", value=X),))))  # fmt: skip
    assert e.text("dense") == "((11000)*-(01000))"
    # the same seed gives the same expressions in both notations, so the answers agree
    sparse, dense = (pl.problems(5, 40, range(1, 6), n) for n in ("sparse", "dense"))
    assert [pl.parse(a) for _, a in sparse] == [pl.parse(a, "dense") for _, a in dense]


def test_expressions_have_their_operation_count_and_text_evaluates():
    rng = random.Random(1)
    for ops in range(0, 11):
        e = pl.random_expr(rng, ops)
        assert e.operations == ops
    e = pl.Expr("*", (pl.Expr("leaf", value=pl.add(X, pl.poly(1))),
                      pl.Expr("neg", (pl.Expr("leaf", value=X),))))  # fmt: skip
    assert e.text() == "((x+1)*-(x))" and pl.show(pl.evaluate(e)) == "6x^2+6x"
    a = pl.problems(5, 30, range(1, 6))
    assert a == pl.problems(5, 30, range(1, 6)) and a != pl.problems(6, 30, range(1, 6))
    assert all(q.endswith("=") and pl.parse(ans) is not None for q, ans in a)


def test_story_names_are_two_tokens_and_mentions_repeat():
    tok = ByteTokenizer()
    rng = random.Random(3)
    repeats = 0
    for _ in range(50):
        text, names = stories.story(rng, 6)
        assert len({n[0] for n in names}) == 3  # first letters differ: the first token says who
        for name in names:
            assert len(tok.encode(name)) == 2
        found = stories.mentions(text, names)
        firsts = [m for m in found if not m.repeat]
        assert {text[m.start : m.start + 2] for m in firsts} <= set(names)
        assert len(firsts) == len({text[m.start : m.start + 2] for m in found})
        repeats += sum(m.repeat for m in found)
        # no other word begins with a name's capital: its first letter only ever starts a name
        capitals = {w[0] for w in text.replace('"', " ").split() if w[:1].isupper()}
        assert capitals - {n[0] for n in names} <= set("AEIOT")
        assert stories.story_names(text) == sorted({text[m.start : m.start + 2] for m in found})
    assert repeats > 100  # induction has something to measure
    assert stories.stories(1, 5) == stories.stories(1, 5) != stories.stories(2, 5)


def test_common_names_recur_across_the_training_corpus():
    """The paper's training data: ordinary names from one fixed list, each met again and again
    across the corpus (not invented per story), a story's cast with different first letters."""
    from collections import Counter

    rng = random.Random(7)
    counts: Counter[str] = Counter()
    for _ in range(700):
        text, names = stories.story(rng, 6, "common")
        assert len({n[0] for n in names}) == 3 and set(names) <= set(stories.COMMON_NAMES)
        counts.update(n for n in names if n in text)
    assert set(counts) == set(stories.COMMON_NAMES)  # every listed name is used ...
    assert min(counts.values()) >= 20  # ... in many stories (700 x 3 / 35 = 60 expected)
    firsts = Counter(n[0] for n in stories.COMMON_NAMES)
    assert max(firsts.values()) >= 3  # a first letter alone does not say which name follows


def test_test_names_never_occur_in_training_and_are_two_tokens():
    """Held-out stories get random two-token names that no common-names training corpus holds:
    not as words, not even as two adjacent letters, so only the earlier mention in the same
    story predicts a repeated name's second token."""
    tok = ByteTokenizer()
    training = "\n".join(stories.stories(7, 3000, 6, "common"))
    assert len(stories.TEST_NAMES) > 300 and not any(n in training for n in stories.TEST_NAMES)
    rng = random.Random(1_000_003)
    repeats = 0
    for _ in range(100):
        text, names = stories.story(rng, 6, "test")
        assert set(names) <= set(stories.TEST_NAMES) and len({n[0] for n in names}) == 3
        for name in names:
            assert len(tok.encode(name)) == 2 and name not in training
            assert text.count(name) == len([m for m in stories.mentions(text, names)
                                             if text.startswith(name, m.start)])  # fmt: skip
        repeats += sum(m.repeat for m in stories.mentions(text, names))
    assert repeats > 200
    # the App. J condition trains on random names: the test names are among them
    random_training = "\n".join(stories.stories(7, 3000, 6, "random"))
    assert sum(n in random_training for n in stories.TEST_NAMES) > 0.9 * len(stories.TEST_NAMES)


def _study(claims, variants=("a", "b")) -> Study:
    return Study(
        name="t", title="T", paper="p", recipe="tiny-cpu", base=(),
        variants=[Variant(v, ()) for v in variants], steps=1, corpus=None, measure=None,
        claims=claims, metrics=["m"],
    )  # fmt: skip


def _results(values: dict[str, list[float]]) -> list[dict]:
    return [{"variant": v, "seed": k, "metrics": {"m": x}, "curve": []}
            for v, xs in values.items() for k, x in enumerate(xs)]  # fmt: skip


@pytest.mark.parametrize(
    "a, b, verdict",
    [
        ([0.9, 0.8, 0.85], [0.5, 0.6, 0.55], "reproduced"),
        ([0.5, 0.6, 0.55], [0.9, 0.8, 0.85], "not reproduced"),
        ([0.7, 0.5, 0.6], [0.55, 0.65, 0.6], "inconclusive"),  # difference within the spread
        ([0.9], [0.1], "inconclusive (fewer than 2 seeds)"),
    ],
)
def test_verdict_needs_a_difference_larger_than_the_spread(a, b, verdict):
    s = summarise(_study([Claim("a", "b", "m")]), _results({"a": a, "b": b}))
    assert s["verdicts"][0]["verdict"] == verdict
    assert s["table"]["a"]["m"]["n"] == len(a)
    lower = summarise(_study([Claim("b", "a", "m", higher_is_better=False)]),
                      _results({"a": a, "b": b}))  # fmt: skip
    assert lower["verdicts"][0]["verdict"] == verdict


def test_a_difference_below_the_floor_is_not_judged():
    """Induction's claim is that copying forms: two variants both below chance differ in noise,
    however consistent across seeds; one above the floor is judged as usual."""
    below = {"a": [0.016, 0.015, 0.016], "b": [0.012, 0.013, 0.012]}
    chance = Claim("a", "b", "m", floor=1 / 26, floor_means="chance")
    assert (
        summarise(_study([Claim("a", "b", "m")]), _results(below))["verdicts"][0]["verdict"]
        == "reproduced"
    )  # the spread rule alone would call it
    verdict = summarise(_study([chance]), _results(below))["verdicts"][0]["verdict"]
    assert verdict == "inconclusive (both at or below 0.038, chance)"
    one_seed = summarise(_study([chance]), _results({"a": [0.016], "b": [0.012]}))
    assert one_seed["verdicts"][0]["verdict"] == verdict  # more seeds would not change it
    above = {"a": [0.30, 0.32, 0.31], "b": [0.012, 0.013, 0.012]}
    assert summarise(_study([chance]), _results(above))["verdicts"][0]["verdict"] == "reproduced"

    # the floor read on another metric: out of domain is judged only once in domain is learnt
    def rows(ood, ind):
        return [{"variant": v, "seed": k, "metrics": {"m": ood[v][k], "in": ind[v][k]},
                 "curve": []} for v in ood for k in range(3)]  # fmt: skip

    ood = {"a": [0.15, 0.16, 0.15], "b": [0.05, 0.06, 0.05]}
    learnt = Claim("a", "b", "m", floor=0.2, floor_means="not learnt", floor_metric="in")
    for ind, verdict in (
        ({"a": [0.1] * 3, "b": [0.1] * 3}, "inconclusive (both at or below 0.200, not learnt)"),
        ({"a": [0.1] * 3, "b": [0.3] * 3}, "reproduced"),
    ):
        assert summarise(_study([learnt]), rows(ood, ind))["verdicts"][0]["verdict"] == verdict


def test_curve_mean_keeps_the_steps_every_seed_has():
    """A resumed run's extra checkpoint (saved on SIGTERM) is left out of the mean over seeds,
    not paired with another seed's next checkpoint."""
    from mtp_dist.repro.study import curve_mean

    a = [(421, 0.1), (500, 0.2), (1000, 0.4)]
    b = [(500, 0.4), (1000, 0.6)]
    assert curve_mean([a, b, []]) == ([500, 1000], [pytest.approx(0.3), pytest.approx(0.5)])
    assert curve_mean([a]) == ([421, 500, 1000], [0.1, 0.2, 0.4]) and curve_mean([]) == ([], [])


def test_docs_section_is_replaced_not_duplicated(tmp_path):
    doc = tmp_path / "reproductions.md"
    doc.write_text("# Reproductions\n\nintro\n")
    update_docs(doc, "x", "first\n", "img/x.png")
    update_docs(doc, "y", "other\n", "img/y.png")
    update_docs(doc, "x", "second\n", "img/x.png")
    text = doc.read_text()
    assert text.count("<!-- repro:x -->") == 1 and "second" in text and "first" not in text
    assert text.index("repro:x") < text.index("repro:y") and text.startswith("# Reproductions")


def test_polynomial_study_smoke_run(tmp_path):
    """Every variant and seed trains, is measured and summarised; a second call trains nothing
    (result.json kept); summary, report, plot and the MLflow parent + children are written."""
    import mlflow

    from mtp_dist.repro.studies import polynomial_arithmetic
    from mtp_dist.repro.study import run_study

    study = polynomial_arithmetic()
    study.variants = study.variants[:2]  # n1, n2: the machinery, not the finding
    summary = run_study(study, tmp_path, seeds=2, smoke=True, say=lambda _: None)
    assert {v["claim"] for v in summary["verdicts"]} >= {"n2 beats n1 on acc_in_domain"}
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert len(saved["results"]) == 4 and saved["smoke"] is True
    for r in saved["results"]:
        assert 0 <= r["metrics"]["acc_in_domain"] <= 1 and r["metrics"]["val_loss_head1"] > 0
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert "| n2 |" in (tmp_path / "report.md").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "mtp_dist-repro"]
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + 4
    stamp = (tmp_path / "runs" / "n1-seed0" / "result.json").stat().st_mtime_ns
    run_study(study, tmp_path, seeds=2, smoke=True, mlflow=False, say=lambda _: None)
    assert (tmp_path / "runs" / "n1-seed0" / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name", ["n-code", "induction", "induction-random", "bytes"])
def test_other_studies_smoke_run(name, tmp_path):
    """The corpus, training and measurement of each other study run end to end (two variants,
    one seed, a few steps): metrics in range, the claims judged (too few seeds to decide)."""
    from mtp_dist.repro.studies import STUDIES
    from mtp_dist.repro.study import run_study

    study = STUDIES[name]()
    first = study.claims[0]  # the two variants its first claim compares
    study.variants = [v for v in study.variants if v.label in (first.better, first.worse)]
    summary = run_study(study, tmp_path, seeds=1, smoke=True, mlflow=False, say=lambda _: None)
    for v in study.variants:
        row = summary["table"][v.label]
        assert row["val_loss_head1"]["mean"] > 0
        for key, stat in row.items():
            if "acc" in key:
                assert 0 <= stat["mean"] <= 1, key
    judged = summary["verdicts"]
    assert judged and all(v["verdict"].startswith("inconclusive") for v in judged)
    if study.curve:
        result = json.loads(
            (tmp_path / "runs" / f"{study.variants[0].label}-seed0" / "result.json").read_text()
        )
        assert [s for s, _ in result["curve"]] == [1, 2, 3, 4, 5, 6]
        best = result["metrics"][f"{study.curve}_best"]
        assert best == max(v for _, v in result["curve"]) >= result["metrics"][study.curve]


def test_parallel_jobs_give_the_single_process_results(tmp_path):
    """Runs trained two at a time in worker processes measure exactly what the same runs
    trained one after another in this process measure (same thread count), and each run's
    result.json is where it would be."""
    from mtp_dist.repro.studies import induction
    from mtp_dist.repro.study import run_study

    study = induction()
    study.variants = study.variants[:1]
    kw = dict(seeds=2, smoke=True, mlflow=False, threads=1, say=lambda _: None)
    run_study(study, tmp_path / "serial", jobs=1, **kw)
    run_study(study, tmp_path / "parallel", jobs=2, **kw)
    serial, parallel = (
        json.loads((tmp_path / d / "summary.json").read_text()) for d in ("serial", "parallel")
    )
    assert parallel["jobs"] == 2 and serial["jobs"] == 1
    for a, b in zip(serial["results"], parallel["results"], strict=True):
        assert (a["variant"], a["seed"]) == (b["variant"], b["seed"])
        assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"]
    assert serial["results"][0]["metrics"] != serial["results"][1]["metrics"]  # seeds differ
    assert (
        tmp_path / "parallel" / "runs" / f"{study.variants[0].label}-seed1" / "result.json"
    ).is_file()


def test_a_run_stopped_by_a_signal_is_not_measured_and_resumes(tmp_path, monkeypatch):
    """SIGTERM / SIGUSR1 make the trainer checkpoint and return early; such a run must not be
    measured as if it had finished (no result.json), and the next call trains it to the end,
    measuring exactly what an unbroken run measures."""
    from mtp_dist.repro.studies import induction
    from mtp_dist.repro.study import run_study
    from mtp_dist.training import Trainer
    from mtp_dist.training.trainer import TrainingAborted

    study = induction()
    study.variants = study.variants[:1]
    kw = dict(seeds=1, smoke=True, mlflow=False, threads=1, say=lambda _: None)
    run_study(study, tmp_path / "unbroken", **kw)
    fit = Trainer.fit

    def signalled_fit(self):  # as if SIGTERM arrived during the first step
        self._stop_requested = True
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", signalled_fit)
    with pytest.raises(TrainingAborted, match="stopped at step 1 of 6"):
        run_study(study, tmp_path / "broken", **kw)
    run = tmp_path / "broken" / "runs" / f"{study.variants[0].label}-seed0"
    assert not (run / "result.json").exists() and (run / "checkpoints").is_dir()
    monkeypatch.setattr(Trainer, "fit", fit)
    run_study(study, tmp_path / "broken", **kw)
    unbroken, resumed = (
        json.loads((tmp_path / d / "summary.json").read_text())["results"][0]
        for d in ("unbroken", "broken")
    )
    assert resumed["metrics"] == unbroken["metrics"] and resumed["curve"] == unbroken["curve"]
