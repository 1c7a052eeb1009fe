"""The built-in environments. Each makes its task from the seeded generator it is given."""

from __future__ import annotations

import random
from typing import Any

from atomlab.envs.base import FORMAT_HINT, Environment, answer_tag


class Arithmetic(Environment):
    name = "arithmetic"
    description = "Add or subtract whole numbers: 2 digits at level 1, 3 at level 2 (results may be negative), 4 at 3."
    levels = 3

    def make(self, rng: random.Random, difficulty: int) -> tuple[str, str, str, dict[str, Any]]:
        digits = difficulty + 1
        low, high = 10 ** (digits - 1), 10**digits - 1
        a, b = rng.randint(low, high), rng.randint(low, high)
        op = rng.choice("+-")
        if op == "-" and difficulty == 1 and b > a:  # level 1 keeps results non-negative
            a, b = b, a
        result = a + b if op == "+" else a - b
        return f"What is {a} {op} {b}? {FORMAT_HINT}", str(result), answer_tag(str(result)), {"a": a, "b": b, "op": op}


ENVIRONMENTS: list[type[Environment]] = [Arithmetic]
