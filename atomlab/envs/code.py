"""`code`: write a small Python function; hidden seeded tests run it in the sandbox.

Each task comes from a template (five per level) with seeded parameters: the prompt states the
function's name, signature and behaviour exactly and shows one example call. The reply's
`<answer>` block holds the code: plain source, or one fenced block (```python ... ```) filling the
whole answer, since models are used to fencing code. The verifier runs it in the sandbox
(`atomlab.envs.sandbox`) against about a dozen hidden tests (edge cases first: empty inputs, values
at the boundaries the prompt names), compares results by value and type, and gives reward 1 only
when every test passes; anything else is 0, with the first failure as the reason.

The hidden tests live in `Task.data["tests"]` as (arguments, expected result) pairs, made when the
task is made by running the template's reference solution (our own code, so run in-process) on
seeded inputs; the gold reply is that reference solution. Each template also carries a near miss,
a plausible bug its hidden tests must catch (the test suite checks that they do).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from atomlab.envs import sandbox
from atomlab.envs.base import Environment, Task, Verdict

Inputs = Callable[[random.Random, dict[str, Any]], list[list[Any]]]
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Template:
    name: str  # the function's name
    level: int
    signature: str  # the parameters and return annotation, after the name
    task: str  # what it returns; $-placeholders are the parameters
    solution: str  # the reference solution's source, with the same placeholders
    near_miss: str  # a plausible wrong solution the hidden tests must catch
    params: Callable[[random.Random], dict[str, Any]]
    inputs: Inputs  # argument lists for the hidden tests, edge cases first


def _ints(rng: random.Random, low: int, high: int, lengths: tuple[int, int] = (2, 9)) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(*lengths))]


def _lists(edge: list[list[int]], low: int, high: int, count: int = 9, lengths: tuple[int, int] = (2, 9)) -> Inputs:
    """Inputs of one list argument: the edge cases, then seeded random lists."""

    def make(rng: random.Random, params: dict[str, Any]) -> list[list[Any]]:
        fixed = [[[p if isinstance(p, int) else params[p] for p in case]] for case in edge]
        return fixed + [[_ints(rng, low, high, lengths)] for _ in range(count)]

    return make


def _around(name: str, spread: int, edge: list[list[int | str]]) -> Inputs:
    """Lists of numbers near the parameter `name` (so values equal to it are common)."""

    def make(rng: random.Random, params: dict[str, Any]) -> list[list[Any]]:
        centre = params[name]
        fixed = [[[params[p] if isinstance(p, str) else p for p in case]] for case in edge]
        return fixed + [[_ints(rng, centre - spread, centre + spread)] for _ in range(9)]

    return make


def _words(letters: Callable[[dict[str, Any]], str], edge: list[str]) -> Inputs:
    def make(rng: random.Random, params: dict[str, Any]) -> list[list[Any]]:
        pool = letters(params)
        words = ["".join(rng.choice(pool) for _ in range(rng.randint(3, 12))) for _ in range(9)]
        return [[word] for word in [_fill(e, params) for e in edge] + words]

    return make


def _pairs_inputs(rng: random.Random, params: dict[str, Any]) -> list[list[Any]]:
    t = params["t"]
    cases: list[list[Any]] = [[[]], [[t // 2, t - t // 2]], [[t // 2] * 3 + [t - t // 2]]]
    for _ in range(9):
        xs = _ints(rng, -3, t + 3)
        xs += [t - rng.choice(xs)]  # at least one pair
        rng.shuffle(xs)
        cases.append([xs])
    return cases


def _fewest(coins: list[int], n: int) -> int:
    best = [0] + [-1] * n
    for total in range(1, n + 1):
        options = [best[total - c] for c in coins if c <= total and best[total - c] >= 0]
        best[total] = 1 + min(options) if options else -1
    return best[n]


def _greedy(coins: list[int], n: int) -> int:
    count = 0
    for c in sorted(coins, reverse=True):
        count, n = count + n // c, n % c
    return count if n == 0 else -1


def _coin_inputs(rng: random.Random, params: dict[str, Any]) -> list[list[Any]]:
    coins = json.loads(params["coins"])
    trap = next(n for n in range(1, 41) if _fewest(coins, n) != _greedy(coins, n))  # where largest-first fails
    return [[n] for n in [0, 1, trap, *sorted(rng.sample(range(2, 41), 9))]]


def _subarray_inputs(rng: random.Random, params: dict[str, Any]) -> list[list[Any]]:
    t = params["t"]
    cases: list[list[Any]] = [[[]], [[t]], [[t, 0, t - 1, 1]]]
    return cases + [[_ints(rng, -2, t + 1, (3, 10))] for _ in range(9)]


def _extreme_inputs(rng: random.Random, params: dict[str, Any]) -> list[list[Any]]:
    cases: list[list[Any]] = [[[5]], [[-3]], [[-4, -1, -7]], [[2, 3, 1]]]
    return cases + [[_ints(rng, -9, 9, (1, 10))] for _ in range(8)]


def _brackets(rng: random.Random, params: dict[str, Any]) -> list[list[Any]]:
    fixed = ["", "()", "([)]", "(((", "a(b)c", "{[()()]}", ")(", "(]"]
    pieces = ["()", "[]", "{}", "(", ")", "[", "]", "{", "}", "x"]
    words = []
    for index in range(10):
        if index % 2 == 0:  # balanced by construction, so about half the random cases are
            word = ""
            for _ in range(rng.randint(1, 5)):
                left, right = rng.choice(["()", "[]", "{}"])
                word = rng.choice([left + word + right, word + left + right])
        else:
            word = "".join(rng.choice(pieces) for _ in range(rng.randint(2, 8)))
        words.append(word)
    return [[word] for word in fixed + words]


# Sets of coins where taking the largest coin first is not always optimal (greedy near misses fail).
COIN_SETS = [[1, 3, 4], [1, 4, 6], [1, 5, 6, 9], [1, 5, 7], [2, 5, 7], [3, 5, 11], [1, 6, 10], [4, 7, 9]]

TEMPLATES = [
    Template(
        "count_above",
        1,
        "(xs: list[int]) -> int",
        "how many numbers in `xs` are strictly greater than $k",
        "def count_above(xs):\n    return sum(1 for x in xs if x > $k)\n",
        "def count_above(xs):\n    return sum(1 for x in xs if x >= $k)\n",
        lambda rng: {"k": rng.randint(-5, 20)},
        _around("k", 4, [[], ["k"], ["k", "k"]]),
    ),
    Template(
        "sum_multiples",
        1,
        "(xs: list[int]) -> int",
        "the sum of the numbers in `xs` that are divisible by $d (0 when there are none)",
        "def sum_multiples(xs):\n    return sum(x for x in xs if x % $d == 0)\n",
        "def sum_multiples(xs):\n    return sum(x for x in xs if x % $d == 0 and x > 0)\n",
        lambda rng: {"d": (d := rng.randint(2, 7)), "minus_d": -d},
        _lists([[], [0], ["d"], [-1, "minus_d", 1]], -30, 30),
    ),
    Template(
        "scale_shift",
        1,
        "(xs: list[int]) -> list[int]",
        "a new list in which each number x of `xs` becomes x * $a + $b, in the same order",
        "def scale_shift(xs):\n    return [x * $a + $b for x in xs]\n",
        "def scale_shift(xs):\n    return [(x + $b) * $a for x in xs]\n",
        lambda rng: {"a": rng.randint(2, 9), "b": rng.randint(1, 9)},
        _lists([[], [0], [1, -1]], -20, 20),
    ),
    Template(
        "remove_char",
        1,
        "(s: str) -> str",
        "`s` with every occurrence of the character '$c' removed",
        "def remove_char(s):\n    return s.replace('$c', '')\n",
        "def remove_char(s):\n    return s.replace('$c', '', 1)\n",
        lambda rng: {"c": rng.choice(ALPHABET)},
        _words(lambda p: p["c"] * 3 + "xyzab", ["", "$c", "$c$c"]),
    ),
    Template(
        "largest_or",
        1,
        "(xs: list[int]) -> int",
        "the largest number in `xs`, or $default when `xs` is empty",
        "def largest_or(xs):\n    return max(xs) if xs else $default\n",
        "def largest_or(xs):\n    return max(xs) if xs else 0\n",
        lambda rng: {"default": rng.choice([-1, -100, 999, 7])},
        _lists([[], [-5], [-3, -9]], -50, 50),
    ),
    Template(
        "stride_powers",
        2,
        "(xs: list[int]) -> list[int]",
        "the elements of `xs` at positions 0, $s, 2*$s, ... (every ${s}th element from the first), "
        "each raised to the power $p, in reverse order",
        "def stride_powers(xs):\n    return [x ** $p for x in xs[::$s]][::-1]\n",
        "def stride_powers(xs):\n    return [x ** $p for x in xs[::$s]]\n",
        lambda rng: {"s": rng.randint(2, 3), "p": rng.randint(2, 3)},
        _lists([[], [4], [1, 2, 3, 4, 5, 6, 7]], -6, 6, lengths=(4, 10)),
    ),
    Template(
        "longest_run_at_least",
        2,
        "(xs: list[int]) -> int",
        "the length of the longest block of consecutive elements of `xs` that are all at least $k "
        "(0 when there is none)",
        "def longest_run_at_least(xs):\n    best = run = 0\n    for x in xs:\n"
        "        run = run + 1 if x >= $k else 0\n        best = max(best, run)\n    return best\n",
        "def longest_run_at_least(xs):\n    best = run = 0\n    for x in xs:\n        if x >= $k:\n"
        "            run += 1\n        else:\n            best = max(best, run)\n            run = 0\n"
        "    return best\n",
        lambda rng: {"k": rng.randint(0, 10)},
        _around("k", 3, [[], ["k"], [-100, "k", "k"]]),
    ),
    Template(
        "top_sum",
        2,
        "(xs: list[int]) -> int",
        "the sum of the $k largest numbers in `xs` (of all of them when `xs` has fewer than $k; "
        "equal numbers count separately)",
        "def top_sum(xs):\n    return sum(sorted(xs, reverse=True)[:$k])\n",
        "def top_sum(xs):\n    return sum(sorted(set(xs), reverse=True)[:$k])\n",
        lambda rng: {"k": rng.randint(2, 4)},
        _lists([[], [7], [5, 5, 5, 5, 5]], 0, 6, lengths=(3, 10)),
    ),
    Template(
        "pair_count",
        2,
        "(xs: list[int]) -> int",
        "how many pairs of positions i < j have xs[i] + xs[j] == $t",
        "def pair_count(xs):\n    return sum(1 for i in range(len(xs)) for j in range(i + 1, len(xs))"
        " if xs[i] + xs[j] == $t)\n",
        "def pair_count(xs):\n    return sum(1 for i in range(len(xs)) for j in range(i, len(xs))"
        " if xs[i] + xs[j] == $t)\n",
        lambda rng: {"t": 2 * rng.randint(2, 8)},
        _pairs_inputs,
    ),
    Template(
        "caesar",
        2,
        "(s: str) -> str",
        "`s` with every lowercase letter a-z moved $n places forward in the alphabet, wrapping around "
        "from z to a; every other character unchanged",
        "def caesar(s):\n    return ''.join(chr((ord(c) - 97 + $n) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)\n",
        "def caesar(s):\n    return ''.join(chr(ord(c) + $n) if 'a' <= c <= 'z' else c for c in s)\n",
        lambda rng: {"n": rng.randint(1, 25)},
        _words(lambda p: "xyzabcm !A", ["", "z", "Hello, world!"]),
    ),
    Template(
        "longest_monotone",
        3,
        "(xs: list[int]) -> int",
        "the length of the longest strictly $way subsequence of `xs` (its elements need not be next "
        "to each other, but keep their order)",
        "def longest_monotone(xs):\n    best = []\n    for i, x in enumerate(xs):\n"
        "        best.append(1 + max([best[j] for j in range(i) if xs[j] $op x], default=0))\n"
        "    return max(best, default=0)\n",
        "def longest_monotone(xs):\n    best = []\n    for i, x in enumerate(xs):\n"
        "        best.append(1 + max([best[j] for j in range(i) if xs[j] $op= x], default=0))\n"
        "    return max(best, default=0)\n",
        lambda rng: rng.choice([{"way": "increasing", "op": "<"}, {"way": "decreasing", "op": ">"}]),
        _lists([[], [3], [2, 2, 2]], 0, 6, lengths=(4, 12)),
    ),
    Template(
        "extreme_block_sum",
        3,
        "(xs: list[int]) -> int",
        "the $which sum of a non-empty block of consecutive elements of `xs` (`xs` is never empty)",
        "def extreme_block_sum(xs):\n"
        "    return $pick(sum(xs[i:j]) for i in range(len(xs)) for j in range(i + 1, len(xs) + 1))\n",
        "def extreme_block_sum(xs):\n    best = run = 0\n    for x in xs:\n        run = $pick(0, run + x)\n"
        "        best = $pick(best, run)\n    return best\n",
        lambda rng: rng.choice([{"which": "largest", "pick": "max"}, {"which": "smallest", "pick": "min"}]),
        _extreme_inputs,
    ),
    Template(
        "blocks_with_sum",
        3,
        "(xs: list[int]) -> int",
        "how many non-empty blocks of consecutive elements of `xs` add up to exactly $t",
        "def blocks_with_sum(xs):\n    return sum(1 for i in range(len(xs)) for j in range(i + 1, len(xs) + 1)"
        " if sum(xs[i:j]) == $t)\n",
        "def blocks_with_sum(xs):\n    return sum(1 for i in range(1, len(xs)) for j in range(i + 1, len(xs) + 1)"
        " if sum(xs[i:j]) == $t)\n",
        lambda rng: {"t": rng.randint(2, 9)},
        _subarray_inputs,
    ),
    Template(
        "fewest_coins",
        3,
        "(n: int) -> int",
        "the fewest coins with values in $coins (each value usable any number of times) that add up to "
        "exactly `n`, 0 when `n` is 0, or -1 when no combination adds up to `n`",
        "def fewest_coins(n):\n    best = [0] + [-1] * n\n    for total in range(1, n + 1):\n"
        "        options = [best[total - c] for c in $coins if c <= total and best[total - c] >= 0]\n"
        "        best[total] = 1 + min(options) if options else -1\n    return best[n]\n",
        "def fewest_coins(n):\n    count = 0\n    for c in sorted($coins, reverse=True):\n"
        "        count += n // c\n        n %= c\n    return count if n == 0 else -1\n",
        lambda rng: {"coins": str(rng.choice(COIN_SETS))},
        _coin_inputs,
    ),
    Template(
        "balanced",
        3,
        "(s: str) -> bool",
        "True when the brackets ( ) [ ] { } in `s` are balanced and properly nested (other characters "
        "are ignored), else False",
        "def balanced(s):\n    pairs = {')': '(', ']': '[', '}': '{'}\n    stack = []\n    for c in s:\n"
        "        if c in '([{':\n            stack.append(c)\n        elif c in pairs:\n"
        "            if not stack or stack.pop() != pairs[c]:\n                return False\n"
        "    return not stack\n",
        "def balanced(s):\n    return all(s.count(a) == s.count(b) for a, b in ['()', '[]', '{}'])\n",
        lambda rng: {},
        _brackets,
    ),
]


def _fill(text: str, params: dict[str, Any]) -> str:
    return string.Template(text).substitute(params)


def _reference(source: str, name: str) -> Callable[..., Any]:
    # Our own template code, not a model's: safe to run in this process.
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<reference {name}>", "exec"), namespace)
    return namespace[name]


def strip_fence(answer: str) -> str:
    """The code inside one ``` fence that fills the whole answer, or the answer as it is."""
    text = answer.strip()
    lines = text.splitlines()
    if len(lines) >= 2 and lines[0].startswith("```") and lines[-1].strip() == "```":
        if lines[0][3:].strip() in ("", "python", "py", "python3"):
            return "\n".join(lines[1:-1]) + "\n"
    return text + "\n"


def render(template: Template, params: dict[str, Any], rng: random.Random) -> tuple[str, list[list[Any]]]:
    """The reference code and the hidden tests ([args, expected] pairs) for a template and its parameters."""
    code = _fill(template.solution, params)
    reference = _reference(code, template.name)
    tests = []
    for args in template.inputs(rng, params):
        tests.append([args, reference(*[list(a) if isinstance(a, list) else a for a in args])])
    return code, tests


class CodeTests(Environment):
    name = "code"
    description = "Write a small Python function (lists, strings, dynamic programming); hidden tests run in a sandbox."
    levels = 3
    limits = sandbox.Limits(cpu_seconds=2, wall_seconds=10)  # the tests are tiny: milliseconds for sane code

    def make(self, rng: random.Random, difficulty: int) -> tuple[str, str, str, dict[str, Any]]:
        template = rng.choice([t for t in TEMPLATES if t.level == difficulty])
        params = template.params(rng)
        code, tests = render(template, params, rng)
        example_args, example_result = next((t for t in tests[::-1] if t[0] and t[0][0]), tests[-1])
        call = f"{template.name}({', '.join(repr(a) for a in example_args)})"
        prompt = (
            f"Write a Python function `{template.name}{template.signature}` that returns "
            f"{_fill(template.task, params)}.\n"
            f"Example: {call} returns {example_result!r}.\n"
            "Reply with the complete code (standard library only; no input() or printing needed) "
            "in <answer></answer>."
        )
        data = {"function": template.name, "template": template.name, "params": params, "tests": tests}
        return prompt, code, f"<answer>\n{code}</answer>", data

    def check(self, task: Task, answer: str) -> Verdict:
        code = strip_fence(answer)
        try:  # a syntax error needs no sandbox; compiling runs nothing
            compile(code, "<solution>", "exec")
        except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
            return Verdict(0.0, f"does not compile: {type(exc).__name__}: {str(exc)[:100]}")
        result = sandbox.run_tests(code, task.data["function"], task.data["tests"], self.limits)
        if result.all_passed:
            return Verdict(1.0, f"passed all {result.total} hidden tests")
        return Verdict(0.0, f"passed {result.passed}/{result.total} hidden tests; {result.error}"[:300])


ENVIRONMENTS: list[type[Environment]] = [CodeTests]
