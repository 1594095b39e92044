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
}
# Resume a dp=2 checkpoint with dp=1 (twice the micro-batch: the same global batch).
DP_CHANGE = {
    "dp2_zero1_to_dp1": "dp2_zero1",
    "dp2_zero2_to_dp1": "dp2_zero2",
    "dp2_zero3_to_dp1": "dp2_zero3",
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
