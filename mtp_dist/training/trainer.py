"""The training loop: data -> engine steps -> validation, checkpoints, tracking, plot.

One loop for every layout: the `Runtime` says where this process sits and builds the engine
(single-process AdamW, or DeepSpeed in the distributed layer). Resume is exact: the checkpoint
holds the engine state, the data readers' positions, the RNG states and the step, so training
2N steps equals N steps + resume + N steps, loss for loss.

What a user sees: problems that can be found without work are refused before any is done (the
device, the paths, the corpus, the tracking store); a failed setup keeps what it completed (the
tokenizer, the shards) for the rerun; Ctrl-C stops like SIGTERM, with a checkpoint (a second
Ctrl-C quits at once); a resume lists what changed in the config; a finished run ends with a
summary and the commands to run next.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shlex
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..config import ConfigError, RunConfig, load_config, to_flat_dict, to_yaml
from ..model import parameter_table
from ..tracking import check_uri, make_tracker
from .data import (
    check_corpus,
    check_paths,
    make_loaders,
    prepare_shards,
    prepare_tokenizer,
    prepared_dirs,
    remove_unfinished,
)
from .engine import StepMetrics
from .freeze import frozen_names
from .plot import plot_head_losses
from .runtime import Runtime, check_device


class TrainingAborted(RuntimeError):
    pass


FIRST_CTRL_C = (
    b"\nCtrl-C: stopping after this step with a checkpoint "
    b"(Ctrl-C again quits at once, without one)\n"
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def stop_signals(handler, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
    """Route `signals` to `handler` while training; the previous handlers come back after."""
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _losses(values) -> str:
    """Per-head losses as a person reads them: 3 decimals, space-separated."""
    return " ".join(f"{x:.3f}" for x in values)


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m {s:02d}s" if hours else f"{m}m {s:02d}s" if m else f"{s}s"


def _tokens(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def config_changes(before: RunConfig, after: RunConfig) -> list[str]:
    """`key: old -> new` for every key whose value differs, in schema order."""
    old, new = to_flat_dict(before), to_flat_dict(after)
    return [f"{k}: {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v]


def _metric_dict(prefix: str, m: StepMetrics) -> dict[str, float]:
    out = {f"{prefix}/loss": m.loss}
    for i, (loss, acc) in enumerate(zip(m.head_losses, m.head_accuracy), start=1):
        out[f"{prefix}/loss_head{i}"] = loss
        out[f"{prefix}/acc_head{i}"] = acc
    return out


# Model keys that change how the weights are used, not what they are: `--init-from` may set them.
WEIGHT_FREE_KEYS = ("loss_impl", "loss_chunk", "init_std", "max_seq_len")


def _model_differences(ours, saved, ignore: tuple[str, ...] = ()) -> str:
    """`model.key=ours (checkpoint: saved)` for each key where two ModelConfigs differ."""
    return ", ".join(
        f"model.{key}={getattr(ours, key)!r} (checkpoint: {value!r})"
        for key, value in asdict(saved).items()
        if key not in ignore and asdict(ours)[key] != value
    )


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        runtime: Runtime | None = None,
        resume: bool = False,
        init_from: str | Path | None = None,
    ):
        """`init_from`: a checkpoint (or run) whose weights and tokenizer a fresh run starts
        from instead of the random init (ignored when resuming: the run's own checkpoint wins)."""
        # A copy: the vocabulary and pad id below come from the tokenizer, and the caller's
        # config stays as the caller made it. `self.cfg` is the resolved one the run uses.
        cfg = copy.deepcopy(cfg)
        self.cfg = cfg
        self.init_from = None
        if init_from is not None:
            self.init_from = ckpt.resolve_checkpoint(init_from)
            # The tokenizer is the checkpoint's: the weights only mean something with it.
            cfg.data.tokenizer = load_config(self.init_from / "config.yaml").data.tokenizer
            cfg.data.tokenizer_path = str(self.init_from / "tokenizer")
        self.runtime = runtime or Runtime()
        self.run_dir = Path(cfg.run_dir)
        self.started = time.perf_counter()
        # What can be refused without work is refused before any is done or anything written:
        # a device this machine lacks, paths it cannot write, a corpus of nothing, a tracking
        # store MLflow cannot use (the tokenizer and the data take minutes on a real corpus).
        check_device(cfg)
        check_paths(cfg)
        check_corpus(cfg)
        if self.runtime.is_main:
            check_uri(cfg)
        # --resume continues the latest complete checkpoint, or starts fresh when there is none
        # (so a restarted launcher can always pass it); without it an existing run is refused.
        existing = ckpt.latest_checkpoint(self.run_dir)
        if existing is not None and not resume:
            raise TrainingAborted(
                f"{self.run_dir} already holds checkpoint {existing.name}: pass --resume to "
                "continue it, or choose a new run_dir"
            )
        # If the setup fails or is interrupted (a tokenizer that cannot be trained, shards too
        # small, a checkpoint that does not load, Ctrl-C), what it completed stays for the
        # rerun to reuse (the tokenizer, shards with their manifest: minutes of work on a real
        # corpus); what it half made goes, and so do the directories made here left empty.
        new = [
            p
            for d in (self.run_dir, *prepared_dirs(cfg))
            for p in (d, *d.parents)
            if not p.exists()
        ]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._setup(existing)
        except BaseException:
            if self.runtime.is_main:
                kept = remove_unfinished(cfg, new)
                if kept:
                    print(f"kept for the next attempt: {', '.join(map(str, kept))}")
            raise
        self._stop_requested = False
        self.interrupts = 0  # Ctrl-C received during fit: 1 stops with a checkpoint, 2 quit
        self._pid = os.getpid()  # forked DataLoader workers inherit the handler: they say nothing

    def _setup(self, existing: Path | None) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.tokenizer = prepare_tokenizer(cfg, self.runtime)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = ckpt.padded_vocab(self.tokenizer.vocab_size)
        if cfg.model.pad_id < 0:
            cfg.model.pad_id = self.tokenizer.pad_id
        ckpt.check_tokenizer(cfg, self.tokenizer, self.run_dir)
        initial = None  # checked before the data is built: a mismatch is refused at once
        if self.init_from is not None and existing is None:
            initial = self._initial_weights(self.init_from)
        manifest = prepare_shards(cfg, self.tokenizer, self.runtime)
        self.train_loader, self.val_loader = make_loaders(
            cfg, manifest, self.tokenizer, self.runtime
        )
        seed_everything(cfg.train.seed)  # same initial weights however the data was prepared
        self.engine = self.runtime.build_engine(cfg, initial)
        self.step = 0
        self.bad_steps = 0
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        if existing is not None:
            self._restore(existing)
        if self.runtime.is_main:
            self._truncate_metrics(self.step)  # with no checkpoint, an abandoned start's rows

    # -- checkpoints ------------------------------------------------------------------------
    def _initial_weights(self, path: Path):
        """(canonical name, tensor) of `path`'s model, whose config must be this run's."""
        from ..checkpoint.weights import read_weights

        weights = read_weights(path)
        saved = weights.cfg.model
        if saved.pad_id < 0:  # left to the tokenizer when it was written, as in _setup
            saved = replace(saved, pad_id=weights.tokenizer.pad_id)
        # The FFN width counts, not how it was written (0 = our rule, or explicit on import).
        ours = replace(self.cfg.model, ffn_hidden=self.cfg.model.ffn_width)
        saved = replace(saved, ffn_hidden=saved.ffn_width)
        differ = _model_differences(ours, saved, ignore=WEIGHT_FREE_KEYS)
        if differ:
            raise ConfigError(f"--init-from {path}: model config differs: {differ}")
        if self.runtime.is_main:
            print(f"initial weights from {path}")
        return weights.stream()

    def _restore(self, path: Path) -> None:
        saved_cfg = load_config(path / "config.yaml")
        saved = saved_cfg.model
        if saved != self.cfg.model:
            differ = _model_differences(self.cfg.model, saved)
            raise TrainingAborted(f"model config differs from the one in {path}: {differ}")
        # The optimizer state holds the trainable parameters only: another freeze would meet
        # moments for other parameters. Changing it is a new run from these weights.
        was, now = saved_cfg.train.freeze, self.cfg.train.freeze
        if was != now:
            raise TrainingAborted(
                f"train.freeze={now} differs from the checkpoint's train.freeze={was} ({path}): "
                "the optimizer state covers other parameters; keep train.freeze, or start a "
                "new run from its weights with --init-from"
            )
        try:
            self.engine.load(path)
            state = ckpt.read_trainer_state(path)
        except ckpt.CheckpointError as err:
            raise ckpt.CheckpointError(f"{err}; {self._fallback(path)}") from err
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.history, self.val_history = state["history"], state["val_history"]
        # One reader position per data-parallel rank. On a new data-parallel size the reader
        # resumes at the same epoch and fraction consumed (not sample-exact: the split changed).
        positions = state["data"]
        same_layout = len(positions) == self.runtime.dp_size
        position = positions[self.runtime.dp_rank if same_layout else 0]
        self.train_loader.load_state_dict(position, strict=same_layout)
        if not same_layout and self.runtime.is_main:
            print(f"data-parallel size {len(positions)} -> {self.runtime.dp_size}: elastic resume")
        set_rng_state(state["rng"])
        if self.runtime.is_main:
            print(f"resumed from {path} at step {self.step}")
            changes = config_changes(saved_cfg, self.cfg)
            if changes:
                print(f"config changed since {path.name}:")
                for line in changes:
                    print(f"  {line}")

    def _fallback(self, broken: Path) -> str:
        """What a user can resume from instead of a checkpoint that does not load."""
        earlier = [p for p in ckpt.complete_checkpoints(self.run_dir) if p != broken]
        if not earlier:
            return f"no earlier complete checkpoint in {broken.parent}; the files are as they were"
        aside = broken.parent / f"broken-{broken.name}"
        return (
            f"the earlier complete checkpoint {earlier[-1].name} is untouched: "
            f"`mv {broken} {aside}` and run again with --resume to continue from it"
        )

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics.jsonl lines past the step training starts from (an interrupted
        attempt's last steps; all of them when no checkpoint was reached), and a line cut
        short by a kill: every step appears once."""
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            kept = []
            for line in metrics.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    pass
            metrics.write_text("".join(line + "\n" for line in kept))

    def save_checkpoint(self) -> None:
        rt = self.runtime
        tmp = ckpt.checkpoints_dir(self.run_dir) / f".tmp-step_{self.step:08d}"
        if rt.is_main:
            ckpt.staging_dir(self.run_dir, self.step)
        try:
            rt.barrier()
            self.engine.save(tmp)  # every rank writes its own shard under a DeepSpeed engine
            data_states = self._gather_data_states()
            if rt.is_main:
                state = {
                    "step": self.step,
                    "bad_steps": self.bad_steps,
                    "history": self.history,
                    "val_history": self.val_history,
                    "data": data_states,
                    "rng": rng_state(),
                }
                ckpt.write_common(tmp, self.cfg, self.tokenizer, state)
            rt.barrier()
            if rt.is_main:
                meta = {"dp_size": rt.dp_size, "time": time.time()}
                ckpt.publish(tmp, self.step, self.cfg.train.keep_last, meta)
        except KeyboardInterrupt:  # a second Ctrl-C mid-write: no half-written checkpoint left
            if rt.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        rt.barrier()

    def _gather_data_states(self) -> list[dict]:
        """Reader positions of every data-parallel rank (rank r's at index r)."""
        return self.runtime.gather_objects(self.train_loader.state_dict())

    # -- the loop ---------------------------------------------------------------------------
    def evaluate(self) -> StepMetrics | None:
        if self.val_loader is None:
            return None
        metrics = []
        for k, batch in enumerate(self.val_loader):
            if k >= self.cfg.train.eval_batches:
                break
            metrics.append(self.engine.eval_step(batch))
        if not metrics:
            return None
        n = len(metrics)
        losses = np.mean([m.head_losses for m in metrics], axis=0).tolist()
        accs = np.mean([m.head_accuracy for m in metrics], axis=0).tolist()
        return StepMetrics(sum(losses), losses, accs, sum(m.tokens for m in metrics) // n)

    def _say(self, message: str) -> None:
        if self.runtime.is_main:
            tqdm.write(message)

    def _request_stop(self, signum, frame) -> None:
        """SIGTERM / SIGUSR1 (Slurm preemption) and a first Ctrl-C: checkpoint after this step
        and stop. A second Ctrl-C quits at once (KeyboardInterrupt: `mtp train` exits 130)."""
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            if os.getpid() == self._pid and self.runtime.is_main:
                # os.write: print() inside a signal handler can meet print() in the main code
                # on the same buffer ("reentrant call")
                os.write(2, FIRST_CTRL_C)
        self._stop_requested = True

    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Train to train.max_steps (or stop, checkpointed, after `stop_after` steps: the
        schedule still follows max_steps, as if the job had been interrupted there)."""
        cfg, rt = self.cfg.train, self.runtime
        last_step = min(cfg.max_steps, stop_after or cfg.max_steps)
        tracker = make_tracker(self.cfg, rt.is_main)
        # What runs are compared by, beside the config: the model's size (the whole model,
        # whatever this rank holds of it).
        table = parameter_table(self.cfg.model)
        params = sum(math.prod(s.shape) for s in table.values())
        frozen = frozen_names(self.cfg.model, cfg.freeze)
        trainable = sum(math.prod(s.shape) for n, s in table.items() if n not in frozen)
        tags = {"parameters": f"{params:,}", "trainable_parameters": f"{trainable:,}"}
        tracker.set_tags({**tags, "run_dir": str(self.run_dir.resolve())})
        self._say(
            f"parameters: {params:,} ({trainable:,} train, {params - trainable:,} frozen: "
            f"train.freeze={cfg.freeze})"
        )
        if rt.is_main:
            self._write_config()
        # Slurm sends SIGTERM (or the --signal we ask for) before preemption, a user Ctrl-C:
        # checkpoint and exit.
        with stop_signals(self._request_stop):
            return self._loop(last_step, tracker)

    def _write_config(self) -> None:
        """<run_dir>/config.yaml: the config of the latest attempt. One that differs from the
        file there keeps the old one beside it, named by when it was written (its header
        comment, the code's version, does not count)."""
        path, text = self.run_dir / "config.yaml", to_yaml(self.cfg)

        def settings(yaml: str) -> list[str]:
            return [line for line in yaml.splitlines() if not line.startswith("#")]

        if path.is_file() and settings(path.read_text()) != settings(text):
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            kept, n = self.run_dir / f"config.{stamp}.yaml", 1
            while kept.exists():
                kept, n = self.run_dir / f"config.{stamp}-{n}.yaml", n + 1
            path.rename(kept)
            print(f"config.yaml: the previous one is kept as {kept}")
        path.write_text(text)

    def _loop(self, last_step: int, tracker) -> list[dict]:
        cfg, rt = self.cfg.train, self.runtime
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not rt.is_main, unit="step")
        data = iter(self.train_loader)
        status = "FAILED"
        self._run_steps, self._run_tokens, self._step_tokens = 0, 0.0, 0.0
        loop_started = time.perf_counter()
        try:
            while self.step < last_step:
                started = time.perf_counter()
                m = self.engine.train_step([next(data) for _ in range(cfg.grad_accum_steps)])
                self.step += 1
                self._record(m, time.perf_counter() - started, tracker, bar)
                self._check_finite(m)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == last_step):
                    self._validate(tracker)
                stop = rt.all_reduce_sum([float(self._stop_requested)])[0] > 0
                if self.step % cfg.ckpt_every == 0 or self.step == last_step or stop:
                    self.save_checkpoint()
                    latest = ckpt.latest_checkpoint(self.run_dir)
                    tracker.set_tags({"checkpoint": str(latest.resolve()) if latest else ""})
                if stop:
                    self._say(
                        f"stop requested: checkpointed step {self.step} "
                        f"({ckpt.latest_checkpoint(self.run_dir)}), exiting; "
                        "--resume continues"
                    )
                    status = "KILLED"
                    return self.history
            status = "FINISHED"
            if rt.is_main and self.step == cfg.max_steps:
                self._final_artifacts(tracker)
                bar.close()
                self._summary(time.perf_counter() - loop_started)
            return self.history
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            bar.close()
            tracker.close(status)

    def _record(self, m: StepMetrics, elapsed: float, tracker, bar) -> None:
        """metrics.jsonl line, progress bar and MLflow metrics (main rank); throughput summed
        over data-parallel ranks."""
        rt, cfg = self.runtime, self.cfg.train
        tokens, seconds = rt.all_reduce_sum([float(m.tokens), elapsed])
        tok_s = tokens / (seconds / rt.dp_size)
        self._run_steps, self._run_tokens = self._run_steps + 1, self._run_tokens + tokens
        self._step_tokens = tokens
        if not m.skipped:
            self.history.append({"step": self.step, "head_losses": m.head_losses})
        if not rt.is_main:
            return
        record = {"step": self.step, **asdict(m), "tokens_per_s": tok_s}
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        heads = " ".join(f"{x:.3f}" for x in m.head_losses)
        bar.set_postfix_str(f"loss {m.loss:.3f} [{heads}] {tok_s:,.0f} tok/s")
        bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            extra = {
                "train/tokens_per_s": tok_s,
                "train/lr": m.lr,
                "train/grad_norm": m.grad_norm,
                "train/tokens_seen": float(self.step * tokens),  # global, every rank's
            }
            tracker.log_metrics({**_metric_dict("train", m), **extra}, self.step)

    def _validate(self, tracker) -> None:
        val = self.evaluate()
        if val is None:
            return
        self.val_history.append({"step": self.step, "head_losses": val.head_losses})
        tracker.log_metrics(_metric_dict("val", val), self.step)
        self._say(f"step {self.step}: validation loss per head {_losses(val.head_losses)}")

    def _check_finite(self, m: StepMetrics) -> None:
        if not m.skipped:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        why = m.extra.get("why", "non-finite loss")
        print(f"step {self.step}: {why} (loss {m.loss}); step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingAborted(
                f"aborting: {self.bad_steps} consecutive steps with {why} (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); last good checkpoint: "
                f"{ckpt.latest_checkpoint(self.run_dir)}"
            )

    def _summary(self, loop_seconds: float) -> None:
        """The block a finished run ends with: time, tokens, losses, checkpoint, what next."""
        cfg, run = self.cfg.train, shlex.quote(str(self.run_dir))
        steps, tokens = self._run_steps, self._run_tokens
        lines = [f"done: step {self.step} of {cfg.max_steps}"]
        if steps:
            seen = self.step * self._step_tokens  # every rank's, as train/tokens_seen
            lines.append(
                f"  time: {_duration(time.perf_counter() - self.started)} ({steps} steps in "
                f"{_duration(loop_seconds)}, {tokens / max(loop_seconds, 1e-9):,.0f} tokens/s); "
                f"{_tokens(seen)} tokens seen"
            )
        else:
            lines.append("  nothing to train: the run had reached train.max_steps")
        last = [h["head_losses"] for h in self.history[-10:]]
        if last:
            mean = np.mean(last, axis=0).tolist()
            lines.append(f"  train loss per head (last {len(last)} steps): {_losses(mean)}")
        if self.val_history:
            val = self.val_history[-1]
            lines.append(
                f"  validation loss per head (step {val['step']}): {_losses(val['head_losses'])}"
            )
        lines += [
            f"  checkpoint: {ckpt.latest_checkpoint(self.run_dir)}",
            "next:",
            f"  mtp generate --checkpoint {run} --prompt 'def add(a, b):' --compare",
            f"  mtp heldout --checkpoint {run}",
            f"  mtp export hf {run} OUT_DIR",
        ]
        self._say("\n".join(lines))

    def _final_artifacts(self, tracker) -> None:
        if self.history:
            plot = plot_head_losses(
                self.history, self.val_history, self.run_dir / "loss_per_head.png"
            )
            tracker.log_artifact(plot)
        tracker.log_artifact(self.run_dir / "config.yaml")
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None:
            tracker.log_artifact(latest / "tokenizer", "tokenizer")
