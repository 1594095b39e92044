"""The layouts the distributed tier runs, shared by conftest.py and the tests.

A module of its own because `conftest` is not importable by name reliably: every test directory
has one, and which of them `import conftest` finds depends on collection order.
"""

from __future__ import annotations

import socket

STEPS, SAVE_AT = 5, 3  # train 5 steps; checkpoint after 3, resume and redo steps 4-5
MAX_DP = 2

# name -> (world size, parallel config). Every layout checkpoints at step SAVE_AT and resumes.
LAYOUTS = {
    "dp2_zero1": (2, {"zero_stage": 1}),
    "dp2_zero2": (2, {"zero_stage": 2}),
    "dp2_zero3": (2, {"zero_stage": 3}),
    "tp2": (2, {"tensor": 2, "zero_stage": 0}),
    "pp2": (2, {"pipeline": 2, "zero_stage": 1}),
    "head2": (2, {"head": 2, "zero_stage": 1}),
    "tp2_head2": (2, {"tensor": 2, "head": 2, "zero_stage": 1}),
    "tp2_pp2": (4, {"tensor": 2, "pipeline": 2, "zero_stage": 1}),
    "head4": (4, {"head": 4, "zero_stage": 1}),
    "tp2_dp2": (4, {"tensor": 2, "zero_stage": 1}),
    # sequence parallelism: alone, across pipeline stages, and with ZeRO-2 data parallelism
    "tp2_sp": (2, {"tensor": 2, "sequence_parallel": True, "zero_stage": 1}),
    "tp2_pp2_sp": (4, {"tensor": 2, "pipeline": 2, "sequence_parallel": True, "zero_stage": 1}),
    "tp2_dp2_sp_zero2": (4, {"tensor": 2, "sequence_parallel": True, "zero_stage": 2}),
    # train.freeze (FREEZE below): layouts of their own, since a frozen trunk is no test of the
    # trunk's gradients or of recompute, which the layouts above cover
    "dp2_zero1_freeze": (2, {"zero_stage": 1}),
    "dp2_zero2_freeze": (2, {"zero_stage": 2}),
    "dp2_zero3_freeze": (2, {"zero_stage": 3}),
    "tp2_sp_freeze": (2, {"tensor": 2, "sequence_parallel": True, "zero_stage": 1}),
    "pp2_freeze": (2, {"pipeline": 2, "zero_stage": 1}),
    "head2_freeze": (2, {"head": 2, "zero_stage": 1}),
    # tied embeddings under ZeRO-3: the heads project by the embedding's partitioned matrix
    "dp2_zero3_tied": (2, {"zero_stage": 3}),
    # what imported models bring (IMPORTED below) under tensor parallelism, with and without
    # sequence parallelism
    "tp2_imported": (2, {"tensor": 2, "zero_stage": 1}),
    "tp2_sp_imported": (2, {"tensor": 2, "sequence_parallel": True, "zero_stage": 1}),
    # the chained family (CHAINED below): ZeRO 1-3, tensor parallelism with and without
    # sequence parallelism, the pipeline with the whole chain and a tied embedding on its last
    # stage (alone, and with tensor + sequence parallelism)
    "dp2_zero1_chained_freeze": (2, {"zero_stage": 1}),
    "dp2_zero2_chained": (2, {"zero_stage": 2}),
    "dp2_zero3_chained": (2, {"zero_stage": 3}),
    "tp2_chained": (2, {"tensor": 2, "zero_stage": 1}),
    "tp2_sp_chained": (2, {"tensor": 2, "sequence_parallel": True, "zero_stage": 1}),
    "pp2_chained": (2, {"pipeline": 2, "zero_stage": 1}),
    "pp2_chained_freeze": (2, {"pipeline": 2, "zero_stage": 1}),
    "tp2_pp2_sp_chained": (4, {"tensor": 2, "pipeline": 2, "sequence_parallel": True,
                               "zero_stage": 1}),
}  # fmt: skip
# Options some layouts train with; each must still give the plain single-process reference.
# model.loss_chunk: the chunked head cross-entropy under the vocab-parallel loss (tp2), with
# sequence parallelism (tp2_sp: each rank's chunk is gathered over the sequence) and head
# parallelism (head2); 6 tokens = 3 positions of a 2-row micro-batch: chunks of 3, 3 and 2 of
# the 8 positions (3 and 1 of a sequence-parallel rank's 4). train.recompute: one mode per
# layout, covering TP, SP, PP, head parallelism and ZeRO 1/2/3. Each feature's plain form stays
# covered by another layout (TP: tp2_dp2; SP: tp2_dp2_sp_zero2; PP: tp2_pp2; heads: head4;
# ZeRO-1: tp2_dp2; ZeRO-2: tp2_dp2_sp_zero2), ZeRO-3's by the dp1_zero3 runs and their resumes
# (world1, world2_grow).
OPTIONS: dict[str, dict] = {
    "dp2_zero1": {"train": {"recompute": "selective"}},
    "dp2_zero2": {"train": {"recompute": "selective"}},
    "dp2_zero3": {"train": {"recompute": "full"}},
    "tp2": {"model": {"loss_chunk": 6}, "train": {"recompute": "full"}},
    "pp2": {"train": {"recompute": "full"}},
    "head2": {"model": {"loss_chunk": 6}, "train": {"recompute": "selective"}},
    "tp2_sp": {"model": {"loss_chunk": 6}, "train": {"recompute": "selective"}},
    "tp2_pp2_sp": {"train": {"recompute": "full"}, "model": {"n_kv_heads": 2}},
    # grouped-query attention (2 key/value heads for 4 query heads: one of each per TP rank),
    # against a reference with the same n_kv_heads: with head parallelism, and above with PP + SP
    "tp2_head2": {"model": {"n_kv_heads": 2}},
}
# train.freeze, each mode on three layouts, against the reference trained with the same mode.
# 'trunk': ZeRO-1; tensor + sequence parallel (frozen norms: no gradient hook; the heads' norms
# and the vocabulary-parallel unembedding train); pipeline (the first stage trains nothing).
# 'trunk_and_head1' (heads 2..4 train): ZeRO-2 with tied embeddings (configs/heads-llama-1b's
# combination: the frozen embedding is also the unembedding); ZeRO-3 with tied embeddings
# (frozen and trained tensors in one gathered module; the embedding's matrix gathered for the
# heads, which dp2_zero3_tied also trains); head parallelism with n_future=2 (the rank of head
# 1 trains nothing at all; the other trains head 2 alone, no shared tensor).
OPTIONS.update({
    "dp2_zero1_freeze": {"train": {"freeze": "trunk"}},
    "tp2_sp_freeze": {"train": {"freeze": "trunk"}},
    "pp2_freeze": {"train": {"freeze": "trunk"}},
    "dp2_zero2_freeze": {"train": {"freeze": "trunk_and_head1"}, "model": {"tie_embeddings": True}},
    "dp2_zero3_freeze": {"train": {"freeze": "trunk_and_head1"}, "model": {"tie_embeddings": True}},
    "head2_freeze": {"train": {"freeze": "trunk_and_head1"}, "model": {"n_future": 2}},
    "dp2_zero3_tied": {"model": {"tie_embeddings": True}},
})  # fmt: skip
# Imported models' options under tensor parallelism: q/k/v biases split with their weights'
# rows, an explicit head_dim (q is 4 x 12 = 48 wide at d 32: two heads per rank), and the
# unembedding tied to the vocabulary-parallel embedding (Megatron's tied column projects by the
# embedding's shard; its two gradients add up on that shard).
IMPORTED = {"attn_bias": True, "head_dim": 12, "tie_embeddings": True, "n_kv_heads": 2}
OPTIONS.update({"tp2_imported": {"model": IMPORTED}, "tp2_sp_imported": {"model": IMPORTED}})
# The chained family: each layout against a chained reference. Recompute (trunk layers only:
# the modules are not, docs/distributed.md) and the chunked loss ride along as on the parallel
# layouts. ZeRO-3 with tied embeddings: the chain's projection and the modules' inputs both use
# the gathered embedding. train.freeze: 'trunk' on ZeRO-1 (the embedding is frozen, so the
# modules' embedded inputs carry no gradient; depth 0, the modules and U train);
# 'trunk_and_head1' on the pipeline (only the modules train: the first stage trains nothing,
# and the tied embedding is frozen on both stages).
CHAINED = {"mtp_arch": "chained"}
OPTIONS.update({
    "dp2_zero1_chained_freeze": {"model": CHAINED, "train": {"freeze": "trunk"}},
    "dp2_zero2_chained": {"model": {**CHAINED, "loss_chunk": 6},
                          "train": {"recompute": "selective"}},
    "dp2_zero3_chained": {"model": {**CHAINED, "tie_embeddings": True},
                          "train": {"recompute": "full"}},
    "tp2_chained": {"model": {**CHAINED, "loss_chunk": 6}, "train": {"recompute": "full"}},
    "tp2_sp_chained": {"model": {**CHAINED, "loss_chunk": 6},
                       "train": {"recompute": "selective"}},
    "pp2_chained": {"model": CHAINED, "train": {"recompute": "full"}},
    "pp2_chained_freeze": {"model": CHAINED, "train": {"freeze": "trunk_and_head1"}},
    "tp2_pp2_sp_chained": {"model": {**CHAINED, "n_kv_heads": 2}},
})  # fmt: skip
FREEZE = {n: o["train"]["freeze"] for n, o in OPTIONS.items() if "freeze" in o.get("train", {})}
MODEL_CHANGING = ("n_kv_heads", "n_future", "tie_embeddings", "attn_bias", "head_dim", "mtp_arch")
"""Options that change the model itself: the layout's reference is built with them."""
TRAIN_CHANGING = ("freeze",)
"""Options that change what trains: the layout's reference trains with them."""


def reference_changes(name: str) -> tuple[tuple, tuple]:
    """(model, train) options of layout `name` its single-process reference must share."""
    options = OPTIONS.get(name, {})
    model = tuple((k, v) for k, v in options.get("model", {}).items() if k in MODEL_CHANGING)
    train = tuple((k, v) for k, v in options.get("train", {}).items() if k in TRAIN_CHANGING)
    return model, train


# Resume a dp=2 checkpoint with dp=1 (twice the micro-batch: the same global batch).
DP_CHANGE = {
    "dp2_zero1_to_dp1": "dp2_zero1",
    "dp2_zero2_to_dp1": "dp2_zero2",
    "dp2_zero3_to_dp1": "dp2_zero3",
    # frozen parameters: no moments to re-partition, and ZeRO-3's frozen weights come whole
    "dp2_zero1_freeze_to_dp1": "dp2_zero1_freeze",
    "dp2_zero3_freeze_to_dp1": "dp2_zero3_freeze",
}
# Resume a dp=1 checkpoint (micro-batch doubled) with dp=2: the same global batch, more ranks.
DP_GROW = {"dp1_zero1_to_dp2": 1, "dp1_zero2_to_dp2": 2, "dp1_zero3_to_dp2": 3}
NAN_CHECK = ("dp2_zero1", "tp2_dp2")  # layouts that end with a non-finite-loss step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dp_size(name: str) -> int:
    world, par = LAYOUTS[name]
    model = max(par.get("tensor", 1), par.get("head", 1))
    return world // (model * par.get("pipeline", 1))
