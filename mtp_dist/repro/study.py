"""Running a reproduction study: variants x seeds trained alike, measured, summarised, judged.

A `Study` names its variants (config overrides on a shipped recipe), a corpus builder, what to
measure on each trained run, and the paper's claims as pairs (this variant should beat that
one on this metric). `run_study` trains every (variant, seed) in turn — resumable: a run whose
`result.json` exists is not trained again — then writes into the output directory
`summary.json`, `report.md` (a table of mean ± spread per variant, the paper's finding beside
ours, a verdict per claim) and `plot.png`, and logs one MLflow parent run with a child run per
(variant, seed). A claim is *reproduced* when the mean difference is in the paper's direction
and larger than the spread of both variants (the largest distance of a seed from its mean),
*not reproduced* when it is that large the other way, and *inconclusive* otherwise: no claim
of a difference smaller than the spread, nor of one between two variants that both sit at or
below the claim's floor (chance, or the level where the capability compared starts).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Claim:
    """The paper's finding as a comparison: `better` beats `worse` on `metric`."""

    better: str
    worse: str
    metric: str
    higher_is_better: bool = True
    floor: float | None = None
    """For a higher-is-better metric, the level at or below which it shows no capability at all
    (chance, or the accuracy a comparison needs): when both variants' means are there, the claim
    is not judged, whatever the difference."""
    floor_means: str = ""
    """What the floor is, in a few words (for the verdict)."""
    floor_metric: str | None = None
    """The metric the floor is read on (default: `metric`), e.g. in-domain accuracy for a claim
    out of domain: a model that has not learnt the task in domain has nothing to extrapolate."""


@dataclass
class Study:
    name: str
    title: str
    paper: str
    """The paper's finding, in a sentence or two, with its numbers."""
    recipe: str
    base: tuple[str, ...]
    variants: list[Variant]
    steps: int
    corpus: Callable[[Path, float, bool], list[str]]
    """(directory, scale, smoke) -> overrides naming the data to train on (data.source, ...),
    built there once for every run of the study."""
    measure: Callable[[Path, bool], dict[str, float]]
    """(run directory, smoke) -> metrics of the trained run (its latest checkpoint)."""
    claims: list[Claim]
    metrics: list[str]
    """Metrics shown in the table, in order."""
    curve: str | None = None
    """A metric (higher is better) also measured at every checkpoint (train.ckpt_every): a
    curve over steps, and `<curve>_best`, its best checkpoint's value."""
    curve_points: int = 5
    smoke_overrides: tuple[str, ...] = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def train_one(study: Study, variant: Variant, seed: int, run_dir: Path, corpus: list[str],
              steps: int, smoke: bool) -> dict:  # fmt: skip
    """Train one (variant, seed) and measure it; the result is kept in run_dir/result.json."""
    from ..config import load_config
    from ..training import Trainer
    from ..training.trainer import TrainingAborted

    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.monotonic()
    every = max(1, steps // study.curve_points) if study.curve else steps
    overrides = [
        *study.base,
        *(study.smoke_overrides if smoke else ()),
        *variant.overrides,
        *corpus,
        f"train.seed={seed}",
        f"train.max_steps={steps}",
        f"train.ckpt_every={every}",
        f"train.eval_every={every}",
        f"train.warmup_steps={max(2, steps // 15)}",
        "train.keep_last=1000",
        "tracking.enabled=false",
        f"run_dir={run_dir}",
    ]
    # resume=True: an interrupted study continues each run from its last complete checkpoint
    trainer = Trainer(load_config(study.recipe, overrides), resume=True)
    trainer.fit()
    if trainer.step < steps:  # SIGTERM / SIGUSR1: the trainer checkpointed and returned early
        raise TrainingAborted(
            f"{variant.label}, seed {seed} stopped at step {trainer.step} of {steps} "
            "(checkpointed); run the same command again to resume"
        )
    metrics = study.measure(run_dir, smoke)
    curve = []
    if study.curve:
        for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
            step = int(ckpt.name.split("_")[1])
            curve.append((step, study.measure(ckpt, smoke)[study.curve]))
        # the best checkpoint, as early stopping on the measured metric would pick it
        metrics[f"{study.curve}_best"] = max(value for _, value in curve)
    val = trainer.val_history[-1]["head_losses"] if trainer.val_history else []
    result = {
        "variant": variant.label,
        "seed": seed,
        "overrides": list(variant.overrides),
        "steps": steps,
        "metrics": {**metrics, **{f"val_loss_head{i + 1}": x for i, x in enumerate(val)}},
        "curve": curve,
        "seconds": time.monotonic() - started,  # training and measuring, this call only
    }
    _atomic_json(done, result)
    return result


def spread(values: list[float]) -> float:
    """Largest distance of a value from the mean (0 for one value)."""
    mean = statistics.fmean(values)
    return max(abs(v - mean) for v in values)


def summarise(study: Study, results: list[dict]) -> dict:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for v in study.variants:
        rows = [r for r in results if r["variant"] == v.label]
        keys = sorted({k for r in rows for k in r["metrics"]})
        table[v.label] = {}
        for k in keys:
            vals = [r["metrics"][k] for r in rows if r["metrics"].get(k) is not None]
            if vals:
                table[v.label][k] = {"mean": statistics.fmean(vals), "spread": spread(vals),
                                     "n": len(vals)}  # fmt: skip
    verdicts = []
    for c in study.claims:
        a, b = table.get(c.better, {}).get(c.metric), table.get(c.worse, {}).get(c.metric)
        if a is None or b is None:
            continue
        diff = (a["mean"] - b["mean"]) * (1 if c.higher_is_better else -1)
        margin = max(a["spread"], b["spread"])
        on = c.floor_metric or c.metric
        level = [table.get(v, {}).get(on, {}).get("mean") for v in (c.better, c.worse)]
        below = c.floor is not None and all(x is not None and x <= c.floor for x in level)
        if below:  # first: no number of seeds would make this the paper's claim
            verdict = f"inconclusive (both at or below {c.floor:.3f}, {c.floor_means})"
        elif min(a["n"], b["n"]) < 2:
            verdict = "inconclusive (fewer than 2 seeds)"
        elif diff > margin:
            verdict = "reproduced"
        elif -diff > margin:
            verdict = "not reproduced"
        else:
            verdict = "inconclusive"
        verdicts.append({"claim": f"{c.better} beats {c.worse} on {c.metric}",
                         "difference": diff, "spread": margin, "verdict": verdict})  # fmt: skip
    return {"table": table, "verdicts": verdicts}


def report_markdown(study: Study, summary: dict, seeds: int, scale: float, results,
                    timing: str = "") -> str:  # fmt: skip
    fmt = lambda s: f"{s['mean']:.3f} ± {s['spread']:.3f}"  # noqa: E731
    lines = [f"## {study.title} (`mtp repro {study.name}`)", "", f"**Paper.** {study.paper}", ""]
    lines.append(f"Seeds per variant: {seeds}; scale {scale}; steps {results[0]['steps']}. "
                 "Cells: mean ± spread (largest distance of a seed from the mean).")  # fmt: skip
    if timing:
        lines[-1] += f" {timing}"
    lines += ["", "| variant | " + " | ".join(study.metrics) + " |",
              "|---|" + "---:|" * len(study.metrics)]  # fmt: skip
    for v in study.variants:
        row = summary["table"].get(v.label, {})
        cells = [fmt(row[m]) if m in row else "—" for m in study.metrics]
        lines.append(f"| {v.label} | " + " | ".join(cells) + " |")
    lines += ["", "| claim | difference | spread | verdict |", "|---|---:|---:|---|"]
    for vd in summary["verdicts"]:
        lines.append(f"| {vd['claim']} | {vd['difference']:+.3f} | {vd['spread']:.3f} | "
                     f"{vd['verdict']} |")  # fmt: skip
    if study.notes:
        lines += ["", study.notes]
    return "\n".join(lines) + "\n"


def curve_mean(curves: list[list]) -> tuple[list[int], list[float]]:
    """The mean over seeds at each step every non-empty curve has: a run stopped and resumed
    has an extra checkpoint (the trainer saves one on SIGTERM) that the other seeds lack."""
    curves = [c for c in curves if c]
    by_step: dict[int, list[float]] = {}
    for c in curves:
        for step, value in c:
            by_step.setdefault(step, []).append(value)
    steps = sorted(s for s, vs in by_step.items() if len(vs) == len(curves))
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot(study: Study, summary: dict, results: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = study.claims[0].metric if study.claims else study.metrics[0]
    panels = 2 if study.curve else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    labels = [v.label for v in study.variants]
    stats = [summary["table"].get(lab, {}).get(metric) for lab in labels]
    ax = axes[0][0]
    ax.bar(labels, [s["mean"] if s else 0 for s in stats],
           yerr=[s["spread"] if s else 0 for s in stats], capsize=4)  # fmt: skip
    for k, lab in enumerate(labels):  # every seed as a dot, so the spread is visible
        ys = [r["metrics"].get(metric) for r in results if r["variant"] == lab]
        ax.plot([k] * len(ys), ys, "k.", alpha=0.6)
    ax.set_title(metric)
    ax.tick_params(axis="x", rotation=30)
    floors = {c.floor_metric or c.metric: c for c in study.claims if c.floor is not None}

    def draw_floor(ax, on: str) -> None:  # a bar below this line shows no capability
        if on in floors:
            c = floors[on]
            ax.axhline(c.floor, color="grey", linestyle="--", label=f"floor: {c.floor_means}")

    draw_floor(ax, metric)
    if study.curve:
        ax = axes[0][1]
        for lab in labels:
            steps, mean = curve_mean([r["curve"] for r in results if r["variant"] == lab])
            if steps:
                ax.plot(steps, mean, marker="o", label=lab)
        draw_floor(ax, study.curve)
        ax.set_xlabel("training step")
        ax.set_title(f"{study.curve} (mean over seeds)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def update_docs(doc: Path, name: str, markdown: str, image: str) -> None:
    """Replace (or append) the study's section of docs/reproductions.md, between markers."""
    start, end = f"<!-- repro:{name} -->", f"<!-- /repro:{name} -->"
    block = f"{start}\n{markdown}\n![{name}]({image})\n{end}"
    text = doc.read_text() if doc.is_file() else "# Reproductions\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def log_mlflow(study: Study, out: Path, results: list[dict], summary: dict) -> str:
    import mlflow

    from ..tracking import use_mlflow

    use_mlflow(f"sqlite:///{out.resolve() / 'mlflow.db'}", "mtp_dist-repro", out / "mlartifacts")
    with mlflow.start_run(run_name=f"repro-{study.name}", tags={"kind": "repro"}) as parent:
        for r in results:
            with mlflow.start_run(run_name=f"{r['variant']}-seed{r['seed']}", nested=True):
                mlflow.log_params({"variant": r["variant"], "seed": r["seed"],
                                   "overrides": " ".join(r["overrides"])})  # fmt: skip
                mlflow.log_metrics({k: v for k, v in r["metrics"].items() if v is not None})
                for step, value in r["curve"]:
                    mlflow.log_metric(f"curve/{study.curve}", value, step=step)
        for label, row in summary["table"].items():
            mlflow.log_metrics({f"{label}/{k}": s["mean"] for k, s in row.items()})
        for name in ("report.md", "plot.png", "summary.json"):
            mlflow.log_artifact(str(out / name))
        return parent.info.run_id


def _worker_init(threads: int, parent: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        # A worker outlives a killed parent unless told otherwise: have the kernel send it
        # SIGTERM when the parent dies (the trainer checkpoints and stops on SIGTERM).
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _train_in_worker(parent: int, *args) -> dict:
    """train_one in a worker that exits after it if the parent is gone, rather than take a task
    already queued to it. (An idle worker needs no check: SIGTERM, unhandled, ends it.)"""
    try:
        return train_one(*args)
    finally:
        if os.getppid() != parent:  # else the worker would wait for a next task forever
            os._exit(1)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _train_all(study: Study, out: Path, corpus: list[str], steps: int, seeds: int, smoke: bool,
               jobs: int, threads: int, say: Callable[[str], None]) -> list[dict]:  # fmt: skip
    """Every (variant, seed), `jobs` at a time in worker processes (1: in this process), each
    with `threads` torch threads.

    Each run is seeded alone, so neither the order nor the number of jobs changes a result
    (tests/test_repro.py); the thread count may, in the last bits of a float reduction."""
    todo = [(v, seed) for v in study.variants for seed in range(seeds)]
    run_dir = lambda v, seed: out / "runs" / f"{v.label}-seed{seed}"  # noqa: E731
    if jobs == 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results = []
            for k, (v, seed) in enumerate(todo):
                say(f"[{k + 1}/{len(todo)}] {study.name}: {v.label}, seed {seed}")
                results.append(train_one(study, v, seed, run_dir(v, seed), corpus, steps, smoke))
            return results
        finally:
            torch.set_num_threads(before)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
    parent = os.getpid()
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                             initargs=(threads, parent)) as pool:  # fmt: skip
        futures = {
            pool.submit(
                _train_in_worker, parent, study, v, seed, run_dir(v, seed), corpus, steps, smoke
            ): k  # fmt: skip
            for k, (v, seed) in enumerate(todo)
        }
        say(f"{study.name}: {len(todo)} runs, {jobs} at a time, {threads} thread(s) each")
        results: list[dict | None] = [None] * len(todo)
        for done, future in enumerate(as_completed(futures), 1):
            try:
                r = future.result()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # runs under way resume later
                raise
            results[futures[future]] = r
            took = r.get("seconds")
            took = f" in {took / 60:.1f} min" if took else ""
            say(f"[{done}/{len(todo)}] {study.name}: {r['variant']}, seed {r['seed']} done{took}")
    return results


def _timing(results: list[dict], wall: float, jobs: int, threads: int) -> str:
    took = [r["seconds"] for r in results if r.get("seconds")]
    per_run = f"; per run {min(took) / 60:.1f}–{max(took) / 60:.1f} min" if took else ""
    return (
        f"Time: {wall / 60:.0f} min wall for this invocation ({jobs} job(s) x {threads} "
        f"thread(s), {usable_cores()} cores{per_run}; runs already done are not retrained)."
    )


def run_study(study: Study, out: Path, *, seeds: int = 3, scale: float = 1.0,
              smoke: bool = False, mlflow: bool = True, docs: Path | None = None,
              jobs: int = 1, threads: int | None = None,
              say: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Train, measure, summarise and judge a study; `jobs` runs at a time, each with `threads`
    torch threads (default: the usable cores shared out among the jobs)."""
    if jobs < 1 or (threads is not None and threads < 1):
        raise ValueError(f"jobs and threads must be >= 1, got {jobs} and {threads}")
    threads = threads or max(1, usable_cores() // jobs)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    steps = max(4, round(study.steps * scale)) if not smoke else 6
    corpus = study.corpus(out / "corpus", scale, smoke)
    results = _train_all(study, out, corpus, steps, seeds, smoke, jobs, threads, say)
    summary = summarise(study, results)
    wall = time.monotonic() - started
    _atomic_json(out / "summary.json", {"study": study.name, "seeds": seeds, "scale": scale,
                                        "smoke": smoke, "jobs": jobs, "threads": threads,
                                        "wall_seconds": wall,
                                        **summary, "results": results})  # fmt: skip
    markdown = report_markdown(
        study, summary, seeds, scale, results, _timing(results, wall, jobs, threads)
    )
    (out / "report.md").write_text(markdown)
    plot(study, summary, results, out / "plot.png")
    if docs is not None:
        image = docs.parent / "img" / f"repro-{study.name}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes((out / "plot.png").read_bytes())
        update_docs(docs, study.name, markdown, f"img/{image.name}")
    if mlflow:
        say(f"mlflow: parent run {log_mlflow(study, out, results, summary)} in {out}/mlflow.db")
    return summary
