"""Batched incremental decoding with KV caches: plain (greedy or sampled) and self-speculative.

Plain decoding feeds one token per sequence per forward and reads head 1 (the next-token head).

Self-speculative decoding (blockwise parallel decoding, Stern et al. 2018; Gloeckle et al. 2024
Sec. 3.2) uses the other heads as drafters. Each sequence carries a pending token c (head 1's
greedy choice, already emitted) and drafts q_2..q_w for the w-1 positions after it. One forward
over the block [c, q_2, .., q_w] at positions L .. L+w-1 (L = tokens already in the cache):

    trunk + head 1 on all w positions      -> g_j = greedy token after block[:j+1]   (verify)
    m  = number of leading drafts with q_{j+1} == g_j                                (accept)
    heads 2..w on block positions 0..m     -> their caches, and at position m the next drafts
    emit q_2..q_{m+1} and g_m; keep m+1 cache slots (rollback past the first mismatch)

Every emitted token is head 1's argmax given the exact greedy prefix, so the output equals plain
greedy decoding (up to floating-point roundoff between differently shaped matmuls; exact in
float64 tests — see docs/speculative_decoding.md). Sequences accept different m and so advance by
different amounts: the cache keeps per-sequence lengths and the block positions are per sequence,
and finished sequences leave the batch (the caches are compacted), so batching never falls back
to one sequence at a time.

Chained models (`model.mtp_arch=chained`) decode the same way with "head 1" = the main model
(trunk, depth 0, final norm, U); their drafts come from the chained modules, each fed the
previous one's draft, with KV caches of their own (chain.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model import MTPModel
from .auto import AutoDrafts, StepCosts, step_costs
from .chain import ChainDrafts, FusedChainModule
from .compiled import StaticStep, compiled_faster
from .fused import FusedBlock, FusedUnembedding, rms_norm, rotary_table
from .heads import DraftHeads, chain_module, head_block, unembedding
from .kv_cache import ModelCache
from .sampling import Stopper, mask_vocab, sample


@dataclass
class DecodeStats:
    """Counters of one or more decoding runs. A 'forward' is one sequence in one batched forward
    (the prefill included), so tokens_per_forward is 1.0 for plain decoding."""

    width: int = 1
    """Tokens per block: 1 for plain decoding, 1 + drafts for speculative."""
    sequences: int = 0
    tokens: int = 0
    forwards: int = 0
    steps: int = 0
    """Batched forwards (what wall-clock time is spent on)."""
    mixed_steps: int = 0
    """Speculative steps in which rows of the batch accepted different numbers of drafts."""
    proposed: list[int] = field(default_factory=list)
    """Per block position j: how often the token there could have been emitted."""
    accepted: list[int] = field(default_factory=list)
    """Per block position j: how often it was (position 0, head 1's token, always is)."""
    verified: list[int] = field(default_factory=list)
    """Per block position j: how often a block held it (a draft made and checked), whether
    or not the budget could take it. verified[1] is vLLM's num_drafts, sum(verified[1:]) its
    num_draft_tokens."""
    matched: list[int] = field(default_factory=list)
    """Per block position j: how often its draft equalled head 1's greedy token, as did every
    draft before it, whether or not the budget could take it (vLLM's
    num_accepted_tokens_per_pos[j-1]: speculative decoding's own counter)."""
    seconds: float = 0.0
    drafts_at_end: int | None = None
    """Draft heads in use when the run ended (n_draft="auto" may drop some, or all: 0);
    None if plain."""
    step_cost: dict | None = None
    """n_draft="auto": measured cost of a step of each block width in plain steps."""
    plain_because: str = ""
    """n_draft="auto" decoding plainly: why, in a few words."""
    calibration_seconds: float = 0.0
    """n_draft="auto": time spent measuring step costs (once per process and batch size;
    not in `seconds`)."""

    def __post_init__(self) -> None:
        self.proposed = self.proposed or [0] * self.width
        self.accepted = self.accepted or [0] * self.width
        self.verified = self.verified or [0] * self.width
        self.matched = self.matched or [0] * self.width

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forwards, 1)

    @property
    def acceptance_rate(self) -> list[float]:
        """Per head position (1..width): fraction of its proposals that were emitted."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def accepted_drafts_per_position(self) -> list[int]:
        """Drafts at block positions 1..width-1 that matched (with all before them): the
        per-position counter serving engines report."""
        return self.matched[1:]

    def merge(self, other: DecodeStats) -> DecodeStats:
        width = max(self.width, other.width)
        pad = lambda xs: xs + [0] * (width - len(xs))
        add = lambda a, b: [x + y for x, y in zip(pad(a), pad(b))]
        return DecodeStats(
            width=width,
            sequences=self.sequences + other.sequences,
            tokens=self.tokens + other.tokens,
            forwards=self.forwards + other.forwards,
            steps=self.steps + other.steps,
            mixed_steps=self.mixed_steps + other.mixed_steps,
            proposed=add(self.proposed, other.proposed),
            accepted=add(self.accepted, other.accepted),
            verified=add(self.verified, other.verified),
            matched=add(self.matched, other.matched),
            seconds=self.seconds + other.seconds,
            drafts_at_end=_smallest(self.drafts_at_end, other.drafts_at_end),
            step_cost=self.step_cost or other.step_cost,
            plain_because=self.plain_because or other.plain_because,
            calibration_seconds=self.calibration_seconds + other.calibration_seconds,
        )

    def as_dict(self) -> dict:
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "forwards": self.forwards,
            "batched_forwards": self.steps,
            "mixed_steps": self.mixed_steps,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "acceptance_rate": [round(r, 4) for r in self.acceptance_rate],
            "accepted_drafts_per_position": self.accepted_drafts_per_position,
            "verified_drafts_per_position": self.verified[1:],
            "drafts_at_end": self.drafts_at_end,
            "step_cost": self.step_cost,
            "plain_because": self.plain_because,
            "calibration_seconds": round(self.calibration_seconds, 4),
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds else None,
        }


def _smallest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass
class DecodeResult:
    tokens: list[list[int]]
    """Generated ids per prompt (EOS not included; cut at the token that completed a stop)."""
    finish_reasons: list[str]
    """'eos', 'stop' or 'length' per prompt."""
    stats: DecodeStats


class Decoder:
    """Decodes batches of token-id prompts with one MTPModel (single process, eval mode)."""

    RECHECK = 16
    """n_draft="auto": every RECHECK-th run that earlier runs would decode plainly drafts
    again (where drafting could pay at all), to re-measure the match rates."""
    MIN_PRIOR = 1
    """n_draft="auto": blocks earlier runs must have verified before their rates decide where a
    run starts. One is enough: its posterior-mean rates (1/3 after a miss, auto.py) already say
    whether starting to draft can pay, and a run that starts plainly costs nothing to find out
    again (RECHECK)."""

    def __init__(
        self,
        model: MTPModel,
        *,
        vocab_limit: int | None = None,
        fused: bool = True,
        step_costs: StepCosts | None = None,
        compile: bool | str = False,
    ) -> None:
        """`fused`: run the trunk and head 1 as `FusedBlock`s (fused.py; the same arithmetic in
        fewer operations); False runs the model's own modules (the benchmark's comparison).
        `step_costs`: what n_draft="auto" takes a step of each width to cost (default: measured
        on first use, auto.py). `compile`: plain decoding steps run compiled with static
        shapes (compiled.py; compiled here, `compile_seconds`; raises CompileError where
        torch.compile cannot build them): True or "on" at every batch size, "auto" at the
        batch sizes where the compiled step measures faster than the eager one."""
        self.model = model
        self.step_costs = step_costs
        self._history: tuple[list[int], list[int]] | None = None  # auto runs' (matched, verified)
        self._auto_runs = 0
        self.vocab_limit = vocab_limit
        self.n_future = model.heads.n_future
        head1 = head_block(model, 0)
        self.blocks = [FusedBlock(b) for b in model.trunk] if fused else list(model.trunk)
        self.head1 = FusedBlock(head1) if fused else head1
        unembed = unembedding(model)
        self.unembed = (
            FusedUnembedding(unembed.norm.weight, unembed.proj.weight, unembed.norm.eps)
            if fused
            else unembed
        )
        self._drafters: dict[int, DraftHeads] = {}
        self.fused = fused
        self.freqs = rotary_table(model)  # (max_len, hd/2) complex
        self.embedding = model.embed.weight.detach()
        self.max_len = model.cfg.max_seq_len
        self.chained = model.cfg.chained
        # The chained family drafts with its modules (chain.py), one after the other.
        modules = [chain_module(model, k) for k in range(1, self.n_future)] if self.chained else []
        self.modules = [FusedChainModule(m) for m in modules] if fused else modules
        self.static: StaticStep | None = None
        self.compile_seconds = 0.0
        self.compile_mode = {True: "on", False: "off"}.get(compile, compile)
        self._static_pays: dict[int, bool] = {}
        if self.compile_mode not in ("on", "off", "auto"):
            raise ValueError(f"compile must be True, False, on, off or auto, got {compile!r}")
        if self.compile_mode != "off":
            self.static = StaticStep(self)
            with torch.inference_mode():
                self.compile_seconds = self.static.compile()

    @property
    def compiled(self) -> bool:
        return self.static is not None

    def static_pays(self, prompts) -> bool:
        """Whether plain runs of this batch size take the compiled step (compile="auto": where
        it measured faster than the eager one, once per batch size; compiled.py)."""
        if self.static is None:
            return False
        if self.compile_mode == "on":
            return True
        if len(prompts) not in self._static_pays:
            self._static_pays[len(prompts)] = compiled_faster(self, prompts)
        return self._static_pays[len(prompts)]

    def trunk(self, ids: torch.Tensor, positions: torch.Tensor, caches):
        """(B, T) ids at positions (B, T) -> trunk output h (B, T, d) and the rotary factors
        (fused path: complex (B, T, 1, hd/2); module path: the model's (cos, sin))."""
        if self.fused:
            rot = self.freqs[positions][:, :, None]  # (B, T, 1, hd/2): every head alike
            x = F.embedding(ids, self.embedding)  # (B, T, d)
            for block, cache in zip(self.blocks, caches):
                x = block(x, rot, cache)
            return x, rot
        cos, sin = rot = self.model.rotary(positions)
        x = self.model.embed(ids)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cos, sin, cache)
        return x, rot

    def head1_hidden(self, h: torch.Tensor, rot, cache) -> torch.Tensor:
        return self.head1(h, rot, cache) if self.fused else self.head1(h, *rot, cache)

    # -- what the chained modules use (chain.py) ------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding) if self.fused else self.model.embed(ids)

    def rotary(self, positions: torch.Tensor):
        """Rotary factors for positions (B, T), in the form this decoder's layers take."""
        if self.fused:
            return self.freqs[positions][:, :, None]  # (B, T, 1, hd/2)
        return self.model.rotary(positions)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Depth 0's output -> h^0 (what module 1 reads)."""
        if self.fused:
            return rms_norm(x, self.unembed.gain, self.unembed.eps)
        return self.unembed.norm(x)

    def run_module(self, i: int, h_prev, embedded, rot, cache) -> torch.Tensor:
        """Chained module i + 1: (B, T, d) inputs -> its normed output (B, T, d)."""
        if self.fused:
            return self.modules[i](h_prev, embedded, rot, cache)
        return self.modules[i](h_prev, embedded, *rot, cache)

    def draft_logits(self, h: torch.Tensor) -> torch.Tensor:
        """U alone (a module's output is normed already): (..., d) -> (..., V)."""
        logits = h @ self.unembed.proj if self.fused else self.unembed.proj(h)
        return mask_vocab(logits, self.vocab_limit)

    def draft_rot(self, rot, span: int) -> torch.Tensor:
        """The draft heads' rotary factors for the first `span` block positions."""
        if self.fused:
            return rot[:, :span]
        cos, sin = (t[:, :span] if t.dtype == torch.float64 else t[:, :span].float() for t in rot)
        return torch.complex(cos, sin)[:, :, None]

    def drafter(self, n_draft: int) -> DraftHeads:
        if n_draft not in self._drafters:
            self._drafters[n_draft] = DraftHeads(self.model, 1, n_draft)
        return self._drafters[n_draft]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return mask_vocab(self.unembed(x), self.vocab_limit)

    @torch.inference_mode()
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        speculative: bool = False,
        n_draft: int | str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        stoppers: Sequence[Stopper | None] | None = None,
    ) -> DecodeResult:
        """Generate up to max_new_tokens per prompt (fewer where the context is full or a
        stopper fires). speculative=True is greedy with `n_draft` draft heads (chained
        models: the first n_draft modules) (default: all);
        n_draft="auto" drafts only while drafting pays, from the step costs measured here and
        the measured acceptance (auto.py), possibly not at all."""
        auto = n_draft == "auto"
        if auto:
            n_draft = None
        drafts = (self.n_future - 1 if n_draft is None else n_draft) if speculative else 0
        if speculative and temperature > 0:
            raise ValueError("self-speculative decoding is greedy: use temperature 0")
        if not 0 <= drafts < self.n_future:
            raise ValueError(f"n_draft must be in [0, {self.n_future - 1}], got {drafts}")
        if not prompts:
            raise ValueError("the batch is empty: no prompts to decode")
        if min(len(p) for p in prompts) < 1:
            raise ValueError("every prompt needs at least one token")
        max_len = self.model.cfg.max_seq_len
        if max(len(p) for p in prompts) > max_len:
            raise ValueError(f"a prompt is longer than model.max_seq_len={max_len}")
        start = time.perf_counter()
        rule = self._auto_rule(prompts, drafts + 1) if auto and drafts else None
        calibration = time.perf_counter() - start
        if rule is not None:
            drafts = rule.start(drafts + 1) - 1
        start = time.perf_counter()
        run = _Run(self, prompts, max_new_tokens, drafts, stoppers)
        run.auto = rule if drafts else None
        choose = lambda logits: sample(logits, temperature, top_p, generator)
        run.prefill(choose)
        while run.active:
            if run.width > 1:
                run.speculative_step()
            else:
                run.plain_step(choose)
        stats = run.stats
        stats.seconds = time.perf_counter() - start
        stats.tokens = sum(len(o) for o in run.out)
        stats.drafts_at_end = run.width - 1 if speculative else None
        if rule is not None:
            stats.step_cost = rule.costs.as_dict()
            stats.calibration_seconds = calibration
            stats.plain_because = rule.reason if run.width == 1 else ""
            if drafts:  # this run's blocks join the rates later runs start from
                self._remember(stats)
        return DecodeResult(run.out, run.reasons, stats)

    def _auto_rule(self, prompts, widest: int) -> AutoDrafts:
        costs = self.step_costs or step_costs(self, [list(p) for p in prompts], widest)
        prior = self._history
        if prior is not None and prior[1][1] < self.MIN_PRIOR:
            prior = None
        self._auto_runs += 1
        return AutoDrafts(costs, prior, explore=self._auto_runs % self.RECHECK == 0)

    def _remember(self, stats: DecodeStats) -> None:
        ours = (stats.matched, stats.verified)
        if self._history is None:
            self._history = (list(ours[0]), list(ours[1]))
            return
        for mine, theirs in zip(self._history, ours):
            mine.extend([0] * (len(theirs) - len(mine)))
            for j, x in enumerate(theirs):
                mine[j] += x


class _Run:
    """The state of one `Decoder.run`: rows of the batch are the still-active sequences."""

    def __init__(
        self,
        dec: Decoder,
        prompts,
        max_new_tokens: int,
        drafts: int,
        stoppers,
        static: bool | None = None,
    ):
        """`static`: plain steps through the compiled step (None: where the decoder's
        `static_pays` says)."""
        self.dec, self.model = dec, dec.model
        self.width = 1 + drafts
        self.max_len = self.model.cfg.max_seq_len
        self.device = self.model.rope_cos.device
        self.prompts = [list(p) for p in prompts]
        n = len(prompts)
        self.budget = [min(max_new_tokens, self.max_len - len(p)) for p in prompts]
        self.stoppers = list(stoppers) if stoppers is not None else [None] * n
        self.out: list[list[int]] = [[] for _ in range(n)]
        self.reasons: list[str] = ["length"] * n
        self.active = list(range(n))  # original prompt index of each batch row
        self.stats = DecodeStats(width=self.width, sequences=n)
        # A row never holds more than max_len positions plus one block being verified.
        capacity = min(max(len(p) for p in prompts) + max_new_tokens, self.max_len) + self.width
        zeros = torch.zeros(n, dtype=torch.long, device=self.device)
        parallel_drafts = drafts if not dec.chained else 0
        self.cache = ModelCache(len(self.model.trunk), 1 + (parallel_drafts > 0), zeros, capacity)
        self.drafter = dec.drafter(drafts) if parallel_drafts else None
        # A module's window reaches up to n_future positions past the trunk's (chain.py).
        self.chain = (
            ChainDrafts(dec, n, drafts, capacity + 2 * self.width)
            if drafts and dec.chained
            else None
        )
        self.pending = zeros  # (B,) the emitted token each row feeds next
        self.drafts = zeros[:, None][:, :0]  # (B, width-1)
        self.steps = torch.arange(self.width, device=self.device)
        self.auto: AutoDrafts | None = None
        self.seen: list[float] = []  # n_draft="auto": seconds of the steps at this width
        # Plain runs of a compiled decoder: the static caches of compiled.py instead.
        if static is None:
            static = drafts == 0 and dec.static_pays(prompts)
        self.static = dec.static if static else None
        if self.static is not None:
            self.keys, self.values = self.static.new_caches(n)

    # -- forwards ---------------------------------------------------------------------------
    def _draft(self, h, rot, last: torch.Tensor) -> torch.Tensor:
        """Next drafts (B, width-1) from the draft heads read at block index `last` (B,)."""
        freqs = self.dec.draft_rot(rot, h.shape[1])
        hidden = self.drafter(h, freqs, last, self.cache.heads[1])  # (B, width-1, d)
        return self.dec.logits(hidden).argmax(dim=-1)

    def prefill(self, choose) -> None:
        lengths = [len(p) for p in self.prompts]
        B, T = len(lengths), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long, device=self.device)  # right-padded
        for b, p in enumerate(self.prompts):
            ids[b, : len(p)] = torch.tensor(p)
        positions = torch.arange(T, device=self.device).expand(B, T)
        last = torch.tensor(lengths, device=self.device) - 1
        if self.static is not None:  # the same function as the compiled step, run eagerly
            logits = self.static.forward(ids, positions, self.keys, self.values, last)
            self.pending = choose(logits)
            self.cache.commit(last + 1)
            self._count_forward()
            self._emit([[t] for t in self.pending.tolist()])
            return
        h, rot = self.dec.trunk(ids, positions, self.cache.trunk)  # (B, T, d)
        rows = torch.arange(B, device=self.device)
        z = self.dec.head1_hidden(h, rot, self.cache.heads[0])  # (B, T, d)
        self.pending = choose(self.dec.logits(z[rows, last]))
        if self.drafter is not None:
            self.drafts = self._draft(h, rot, last)
        elif self.chain is not None:  # the prompt's tokens 1.. and the pending one are known
            start = self.cache.lengths
            self.drafts = self.chain(self.dec.final_norm(z), ids, last, self.pending, start)
        # Pad slots past each prompt were written but are not kept (the next forward overwrites).
        self.cache.commit(last + 1)
        self._count_forward()
        self._emit([[t] for t in self.pending.tolist()])

    def plain_step(self, choose) -> None:
        if self.static is not None:
            logits = self.static.step(self.pending, self.cache.lengths, self.keys, self.values)
            self.pending = choose(logits)
        else:
            positions = self.cache.lengths[:, None]  # (B, 1)
            h, rot = self.dec.trunk(self.pending[:, None], positions, self.cache.trunk)
            x = self.dec.head1_hidden(h, rot, self.cache.heads[0])[:, 0]  # (B, d)
            self.pending = choose(self.dec.logits(x))
        self.cache.commit(1)
        self._count_forward()
        self._emit([[t] for t in self.pending.tolist()])

    def _verify(self, block: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head 1's greedy tokens along the block and the accepted draft count per row.

        The first two columns in one unembedding call (the first is always needed and the
        second whenever the first draft is accepted, which a trained head 2 mostly is: one call
        over two rows cost ~1.1-1.5x one row on the CPUs measured, two calls 2x); then column
        by column, only for rows whose drafts so far all matched: a row's logits past its first
        mismatch are never needed, and the later heads are accepted far less often.
        Returns greedy (B, w) (entries past a row's first mismatch are unused, some -1) and
        accepted (B,)."""
        B, w = block.shape
        first = min(w, 2)
        greedy = torch.full_like(block, -1)
        greedy[:, :first] = self.dec.logits(x[:, :first]).argmax(dim=-1)
        accepted = (block[:, 1:first] == greedy[:, : first - 1]).long().sum(dim=1)
        alive = torch.nonzero(accepted == first - 1).flatten()  # rows with all drafts matched
        for j in range(first, w):
            if alive.numel() == 0:
                break
            alive = alive[block[alive, j] == greedy[alive, j - 1]]
            if alive.numel() == 0:
                break
            accepted[alive] += 1
            greedy[alive, j] = self.dec.logits(x[alive, j]).argmax(dim=-1)  # (A,)
        return greedy, accepted

    def speculative_step(self) -> None:
        began = time.perf_counter()
        B, w = len(self.active), self.width
        block = torch.cat([self.pending[:, None], self.drafts], dim=1)  # (B, w)
        # Positions past the context end only occur in blocks whose tail cannot be emitted
        # (the budget stops first); clamping keeps the rotary lookup in range for them.
        positions = (self.cache.lengths[:, None] + self.steps).clamp(max=self.max_len - 1)
        h, rot = self.dec.trunk(block, positions, self.cache.trunk)  # (B, w, d)
        x = self.dec.head1_hidden(h, rot, self.cache.heads[0])  # (B, w, d)
        greedy, accepted = self._verify(block, x)
        rows = torch.arange(B, device=self.device)
        # Draft heads only need the kept positions 0..accepted: keys/values for their cache,
        # and their output at `accepted` (the last kept position) for the next drafts.
        span = int(accepted.max()) + 1
        self.pending = greedy[rows, accepted]
        if self.chain is not None:  # modules read depth 0's normed output and the new tokens
            h0 = self.dec.final_norm(x[:, :span])
            self.drafts = self.chain(h0, block, accepted, self.pending, self.cache.lengths)
        else:
            self.drafts = self._draft(h[:, :span], rot, accepted)
        self.cache.commit(accepted + 1)
        # Statistics: draft j counts as proposed when emitting it could fit in the budget.
        acc, left = accepted.tolist(), [self.budget[i] - len(self.out[i]) for i in self.active]
        self.stats.mixed_steps += len(set(acc)) > 1
        for j in range(1, w):
            self.stats.proposed[j] += sum(1 for r in left if j < r)
            self.stats.accepted[j] += sum(1 for a, r in zip(acc, left) if j < r and a >= j)
            self.stats.verified[j] += B
            self.stats.matched[j] += sum(1 for a in acc if a >= j)
        self._count_forward()
        blocks, pend = block.tolist(), self.pending.tolist()
        self._emit([blocks[b][1 : acc[b] + 1] + [pend[b]] for b in range(B)])
        if self.auto is not None:
            self.seen.append(time.perf_counter() - began)
            self._narrow(self.auto.keep(self.stats, self.width, self.seen))

    def _narrow(self, width: int) -> None:
        """Use only the first width-1 draft heads from now on (their caches stay valid);
        width 1: decode plainly from now on (the pending token is head 1's greedy one)."""
        if width == self.width:
            return
        k = width - 1
        self.seen = []
        if k == 0:
            pass  # the draft heads' caches are no longer read
        elif self.chain is not None:
            self.chain.narrow(k)
        else:
            self.drafter = self.drafter.leading(k)
            self.cache.heads[1].keep_heads(k * self.drafter.n_kv_heads)
        self.drafts = self.drafts[:, :k]
        self.width, self.steps = width, self.steps[:width]

    # -- bookkeeping ------------------------------------------------------------------------
    def _count_forward(self) -> None:
        self.stats.forwards += len(self.active)
        self.stats.steps += 1
        self.stats.proposed[0] += len(self.active)
        self.stats.accepted[0] += len(self.active)
        self.stats.verified[0] += len(self.active)
        self.stats.matched[0] += len(self.active)

    def _emit(self, new_tokens: list[list[int]]) -> None:
        """Append each row's new tokens in order until its budget or stopper ends it; drop
        finished rows from the batch (and from the caches)."""
        keep = []
        for row, (i, toks) in enumerate(zip(self.active, new_tokens)):
            out, stopper, reason = self.out[i], self.stoppers[i], None
            for tok in toks:
                if len(out) >= self.budget[i]:
                    reason = "length"
                    break
                out.append(tok)
                reason = stopper.push(tok) if stopper is not None else None
                if reason == "eos":
                    out.pop()
                if reason is not None:
                    break
            if reason is None and len(out) >= self.budget[i]:
                reason = "length"
            if reason is None:
                keep.append(row)
            else:
                self.reasons[i] = reason
        if len(keep) < len(self.active):
            idx = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.cache.select(idx)
            if self.chain is not None:
                self.chain.select(idx)
            if self.static is not None:
                self.keys = [k[idx] for k in self.keys]
                self.values = [v[idx] for v in self.values]
            self.pending, self.drafts = self.pending[idx], self.drafts[idx]
            self.active = [self.active[r] for r in keep]
