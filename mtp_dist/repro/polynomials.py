"""Polynomial arithmetic in the ring F7[X]/(X^5) (the paper's Sec. 4.2 / App. K task).

Elements are polynomials of degree < 5 with coefficients mod 7, written canonically from the
highest power down (`3x^4+x^2+6x+1`, `0` for zero). Operations: unary negation `-(p)`,
addition `(p)+(q)`, multiplication `(p)*(q)` (truncated: X^5 = 0) and composition `(p)o(q)`
= p(q(X)) in the ring. A problem is a random expression of k operations over random sparse
leaves, one line `EXPR=ANSWER`; the model sees `EXPR=` and must write ANSWER. `evaluate` is
the exact reference and `parse` reads a written answer back, so scoring a model compares ring
elements, not strings.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

P, N = 7, 5  # coefficients mod P; X^N = 0
Poly = tuple[int, ...]  # N coefficients, index = power


def poly(*coeffs: int) -> Poly:
    """From coefficients of x^0, x^1, ... (missing ones 0)."""
    c = [x % P for x in coeffs[:N]]
    return tuple(c + [0] * (N - len(c)))


def neg(p: Poly) -> Poly:
    return tuple((-a) % P for a in p)


def add(p: Poly, q: Poly) -> Poly:
    return tuple((a + b) % P for a, b in zip(p, q))


def mul(p: Poly, q: Poly) -> Poly:
    out = [0] * N
    for i, a in enumerate(p):
        if a:
            for j in range(N - i):
                out[i + j] = (out[i + j] + a * q[j]) % P
    return tuple(out)


def compose(p: Poly, q: Poly) -> Poly:
    """p(q(X)) mod X^5: Horner's rule in the ring."""
    out = poly()
    for a in reversed(p):
        out = add(mul(out, q), poly(a))
    return out


def show(p: Poly, notation: str = "sparse") -> str:
    """The canonical text of p: `sparse` (`3x^2+1`) or `dense` (`10300`, the coefficients of
    x^0 .. x^4, one digit each, always five)."""
    if notation == "dense":
        return "".join(str(a) for a in p)
    terms = []
    for power in range(N - 1, -1, -1):
        a = p[power]
        if not a:
            continue
        coef = "" if a == 1 and power else str(a)
        terms.append(coef + ("" if power == 0 else "x" if power == 1 else f"x^{power}"))
    return "+".join(terms) or "0"


_TERM = re.compile(r"^(\d*)(x(?:\^(\d+))?)?$")


def parse(text: str, notation: str = "sparse") -> Poly | None:
    """The ring element a written answer denotes (sparse: any term order, repeated powers
    summed), or None when it is not a polynomial in this notation."""
    if notation == "dense":
        text = text.strip()
        ok = len(text) == N and all(c in "0123456" for c in text)
        return tuple(int(c) for c in text) if ok else None
    coeffs = [0] * N
    for term in text.strip().split("+"):
        m = _TERM.match(term)
        if not term or not m or (not m.group(1) and not m.group(2)):
            return None
        a = int(m.group(1)) if m.group(1) else 1
        power = 0 if not m.group(2) else int(m.group(3) or 1)
        if power >= N:
            return None
        coeffs[power] += a
    return poly(*coeffs)


@dataclass(frozen=True)
class Expr:
    op: str  # "leaf", "neg", "+", "*", "o"
    args: tuple = ()
    value: Poly | None = None  # leaves only

    @property
    def operations(self) -> int:
        return 0 if self.op == "leaf" else 1 + sum(a.operations for a in self.args)

    def text(self, notation: str = "sparse") -> str:
        if self.op == "leaf":
            return f"({show(self.value, notation)})"
        if self.op == "neg":
            return f"-{self.args[0].text(notation)}"
        left, right = (a.text(notation) for a in self.args)
        return f"({left}{self.op}{right})"


def evaluate(e: Expr) -> Poly:
    if e.op == "leaf":
        return e.value
    vals = [evaluate(a) for a in e.args]
    if e.op == "neg":
        return neg(vals[0])
    return {"+": add, "*": mul, "o": compose}[e.op](*vals)


def random_leaf(rng: random.Random) -> Expr:
    """A sparse random polynomial (1-2 terms) so expressions stay short."""
    coeffs = [0] * N
    for _ in range(rng.randint(1, 2)):
        coeffs[rng.randrange(3)] = rng.randrange(1, P)
    return Expr("leaf", value=poly(*coeffs))


def random_expr(rng: random.Random, operations: int) -> Expr:
    """A uniformly shaped random expression with exactly `operations` operations."""
    if operations == 0:
        return random_leaf(rng)
    op = rng.choice(("neg", "+", "*", "o"))
    if op == "neg":
        return Expr("neg", (random_expr(rng, operations - 1),))
    left = rng.randint(0, operations - 1)
    return Expr(op, (random_expr(rng, left), random_expr(rng, operations - 1 - left)))


def problem(rng: random.Random, operations: int, notation: str = "sparse") -> tuple[str, str]:
    """(prompt `EXPR=`, canonical answer)."""
    e = random_expr(rng, operations)
    return e.text(notation) + "=", show(evaluate(e), notation)


def problems(seed: int, count: int, operations: range,
             notation: str = "sparse") -> list[tuple[str, str]]:  # fmt: skip
    """`count` problems, operation counts cycling through `operations`, deterministic in seed
    (the same expressions in either notation)."""
    rng = random.Random(seed)
    ops = list(operations)
    return [problem(rng, ops[k % len(ops)], notation) for k in range(count)]
