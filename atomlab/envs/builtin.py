"""The built-in environments. Each makes its task from the seeded generator it is given.

Every answer has one canonical text and `check` accepts only that text (countdown, whose answer is
any expression that works, is the exception: it parses and evaluates the expression). Whole numbers
are written as digits with an optional leading `-` and no leading zeros (`100`, `-7`, `0`); lists as
integers separated by a comma and a space (`3, 1, 2`), no brackets. The prompt of each task states
its format, so a near-miss (`1000` for `100`, `3,1,2`, `[3, 1, 2]`, `the answer is 12`) scores 0.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from atomlab.envs.base import FORMAT_HINT, Environment, Task, Verdict, answer_tag

INTEGER = re.compile(r"-?[1-9][0-9]*|0")
INTEGER_LIST = re.compile(r"-?[0-9]+(?:, -?[0-9]+)*")
NUMBER_ONLY = "Write just the number (digits only, no units)."
LIST_FORMAT = "Write the list as integers separated by a comma and a space, like 3, 1, 2 (no brackets)."

Made = tuple[str, str, str, dict[str, Any]]  # what `Environment.make` returns


def _quoted(answer: Any) -> str:
    """The start of a wrong answer for a verdict's reason; short, so a huge answer costs nothing."""
    return repr(answer[:40]) if isinstance(answer, str) else type(answer).__name__


def _short(value: Any, limit: int = 40) -> str:
    """A number or text for a reason, cut to `limit` characters (a 200-digit product would flood logs)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class ExactAnswer(Environment):
    """An environment whose answer has one canonical text: exact match, with a reason naming the near-miss."""

    def check(self, task: Task, answer: str) -> Verdict:
        if not isinstance(answer, str):
            return Verdict(0.0, f"answer is not text ({_quoted(answer)})")
        if answer == task.answer:
            return Verdict(1.0, "correct")
        if INTEGER.fullmatch(task.answer) and not INTEGER.fullmatch(answer):
            return Verdict(
                0.0, f"not a whole number in canonical form (digits, optional -, no leading 0): {_quoted(answer)}"
            )
        return Verdict(0.0, f"wrong answer {_quoted(answer)}")


def _made(prompt: str, answer: str | int, data: dict[str, Any] | None = None) -> Made:
    """Prompt (ending with the format hint), canonical answer, gold reply and verifier data."""
    answer = str(answer)
    return f"{prompt} {FORMAT_HINT}", answer, answer_tag(answer), data or {}


def _join(numbers: list[int]) -> str:
    return ", ".join(str(number) for number in numbers)


class Arithmetic(ExactAnswer):
    name = "arithmetic"
    description = "Add or subtract whole numbers: 2 digits at level 1, 3 at level 2 (results may be negative), 4 at 3."
    levels = 3

    def make(self, rng: random.Random, difficulty: int) -> Made:
        digits = difficulty + 1
        low, high = 10 ** (digits - 1), 10**digits - 1
        a, b = rng.randint(low, high), rng.randint(low, high)
        op = rng.choice("+-")
        if op == "-" and difficulty == 1 and b > a:  # level 1 keeps results non-negative
            a, b = b, a
        result = a + b if op == "+" else a - b
        reply = f"<think>{column_working(a, b, op)}</think>{answer_tag(str(result))}"
        return f"What is {a} {op} {b}? {FORMAT_HINT}", str(result), reply, {"a": a, "b": b, "op": op}


def column_working(a: int, b: int, op: str) -> str:
    """Written column arithmetic, units first, as the gold reasoning: every step is a one-digit sum
    or difference with its carry or borrow, which a small model learns far sooner than whole answers.
    47 + 38 -> "7+8=15, 4+3+1=8"; 83 - 47 -> "13-7=6, 8-4-1=3"; 47 - 83 -> "83>47, so -(83-47): ..."."""
    if op == "-" and b > a:
        return f"{b}>{a}, so -({b}-{a}): {column_working(b, a, op)}"
    units_first_a, units_first_b = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for place in range(max(len(units_first_a), len(units_first_b))):
        x = int(units_first_a[place]) if place < len(units_first_a) else 0
        y = int(units_first_b[place]) if place < len(units_first_b) else 0
        if op == "+":
            total = x + y + carry
            steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
            carry = total // 10
        else:
            value = x - y - carry
            borrow = value < 0
            steps.append(f"{'1' if borrow else ''}{x}-{y}{'-1' if carry else ''}={value + 10 * borrow}")
            carry = int(borrow)
    return ", ".join(steps)


# ---------------------------------------------------------------------------------------------------
# countdown: the answer is any expression that reaches the target, so it is parsed, never eval'd


class _InvalidExpression(Exception):
    pass


_OPERATORS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
# Checked before parsing, so names, calls, attributes and strings never reach the parser;
# `**`, `//` and unary minus parse, and `_evaluate` refuses them.
_EXPRESSION_TEXT = re.compile(r"[0-9+\-*/() ]+")
MAX_EXPRESSION_CHARS = 200  # the longest gold expression is under 60 characters


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """The exact value of a parsed expression of integer literals and + - * /; collects the literals."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise _InvalidExpression("division by zero")
            if (left / right).denominator != 1:
                raise _InvalidExpression(f"{_short(left)} / {_short(right)} does not come out even")
        return _OPERATORS[type(node.op)](left, right)
    raise _InvalidExpression("only whole numbers, + - * / and parentheses are allowed")


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[str, int]:
    """Combine all `numbers` in a random order with random operations whose results stay positive whole numbers."""
    pool: list[tuple[str, int, bool]] = [(str(n), n, True) for n in numbers]  # (text, value, is a bare number)
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (text_a, a, leaf_a), (text_b, b, leaf_b) = pool[i], pool[j]
        ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
        op = rng.choice(ops)
        value = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}[op](a, b)
        text = f"{text_a if leaf_a else f'({text_a})'} {op} {text_b if leaf_b else f'({text_b})'}"
        pool = [entry for k, entry in enumerate(pool) if k not in (i, j)] + [(text, value, False)]
    return pool[0][0], pool[0][1]


class Countdown(Environment):
    name = "countdown"
    description = (
        "Reach a target from given numbers with + - * / (each number at most once, divisions even): "
        "3 numbers at level 1, 4 at level 2, 6 and a 3-digit target at level 3."
    )
    levels = 3
    # level: (how many numbers, how many the gold expression uses, lowest and highest target)
    LEVELS = {1: (3, (2, 3), 2, 100), 2: (4, (3, 4), 10, 500), 3: (6, (4, 6), 100, 999)}

    def make(self, rng: random.Random, difficulty: int) -> Made:
        count, (fewest, most), low, high = self.LEVELS[difficulty]
        while True:  # most draws land in range within a few tries
            if difficulty == 3:
                numbers = [rng.randint(1, 10) for _ in range(4)] + rng.sample([25, 50, 75, 100], 2)
            else:
                numbers = [rng.randint(1, 10 if difficulty == 1 else 25) for _ in range(count)]
            expression, target = _random_expression(rng, rng.sample(numbers, rng.randint(fewest, most)))
            if low <= target <= high and target not in numbers:  # no one-number answers
                break
        prompt = (
            f"Using the numbers {_join(numbers)}, make {target}. You may use + - * / and parentheses; use each "
            "number at most once (you need not use them all), and every division must come out even. "
            f"Write only the expression, without = {target}."
        )
        return _made(prompt, expression, {"numbers": numbers, "target": target})

    def check(self, task: Task, answer: str) -> Verdict:
        if not isinstance(answer, str) or len(answer) > MAX_EXPRESSION_CHARS or not _EXPRESSION_TEXT.fullmatch(answer):
            return Verdict(0.0, f"not an expression of numbers, + - * / and parentheses: {_quoted(answer)}")
        try:
            tree = ast.parse(answer, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return Verdict(0.0, f"not a valid expression: {_quoted(answer)}")
        used: list[int] = []
        try:
            value = _evaluate(tree.body, used)
        except (_InvalidExpression, RecursionError) as exc:
            return Verdict(0.0, str(exc) or "expression nested too deeply")
        extra = Counter(used) - Counter(task.data["numbers"])
        if extra:
            return Verdict(
                0.0, f"uses {_short(_join(sorted(extra.elements())))} beyond the numbers given (each at most once)"
            )
        if value != task.data["target"]:
            return Verdict(0.0, f"the expression makes {_short(value)}, not {task.data['target']}")
        return Verdict(1.0, "correct")


# ---------------------------------------------------------------------------------------------------
# list-ops


def _dedupe(values: list[int]) -> list[int]:
    return list(dict.fromkeys(values))  # dicts keep insertion order: the first occurrence wins


LIST_OPERATIONS: dict[str, tuple[str, Callable[[list[int]], list[int]]]] = {
    "sort": ("sort it in ascending order", sorted),
    "sort-desc": ("sort it in descending order", lambda values: sorted(values, reverse=True)),
    "reverse": ("reverse it", lambda values: values[::-1]),
    "dedupe": ("remove duplicates, keeping the first occurrence of each number in place", _dedupe),
}
LIST_REDUCTIONS: dict[str, tuple[str, Callable[[list[int]], int]]] = {
    "max": ("give its largest number", max),
    "min": ("give its smallest number", min),
}


class ListOps(ExactAnswer):
    name = "list-ops"
    description = (
        "Sort, reverse, dedupe, max or min of a list of integers: 5 numbers at level 1, 8 at level 2, "
        "12 and two steps at level 3."
    )
    levels = 3
    LEVELS = {1: (5, 0, 20), 2: (8, -50, 50), 3: (12, -999, 999)}  # level: (length, lowest, highest)

    def make(self, rng: random.Random, difficulty: int) -> Made:
        length, low, high = self.LEVELS[difficulty]
        values = [rng.randint(low, high) for _ in range(length)]
        for _ in range(rng.randint(1, 2)):  # repeats, so dedupe has work to do and sorts have ties
            values[rng.randrange(length)] = rng.choice(values)
        names = ["sort", "reverse", "dedupe"] + (["sort-desc"] if difficulty > 1 else [])
        steps = [rng.choice(names + ["max", "min"])]
        if difficulty == 3:  # a list step, then another list step or a reduction
            steps = [rng.choice(names), rng.choice(names + ["max", "min"])]
            while steps[1] == steps[0]:
                steps[1] = rng.choice(names + ["max", "min"])
        result: list[int] | int = values
        words = []
        for step in steps:
            if step in LIST_REDUCTIONS:
                words.append(LIST_REDUCTIONS[step][0])
                result = LIST_REDUCTIONS[step][1](result)
            else:
                words.append(LIST_OPERATIONS[step][0])
                result = LIST_OPERATIONS[step][1](result)
        form = NUMBER_ONLY if isinstance(result, int) else LIST_FORMAT
        prompt = f"Take the list {_join(values)}: {', then '.join(words)}. {form}"
        answer = str(result) if isinstance(result, int) else _join(result)
        return _made(prompt, answer, {"values": values, "steps": steps})

    def check(self, task: Task, answer: str) -> Verdict:
        verdict = super().check(task, answer)
        if (
            verdict.reward == 0
            and "," in task.answer
            and isinstance(answer, str)
            and not INTEGER_LIST.fullmatch(answer)
        ):
            return Verdict(0.0, f"not a list in the form 3, 1, 2: {_quoted(answer)}")
        return verdict


# ---------------------------------------------------------------------------------------------------
# strings

WORDS = (
    "apple river stone cloud garden pencil window silver dragon planet orange bridge candle forest "
    "guitar harbor island jacket kitten ladder marble needle ocean pepper quartz rabbit saddle tunnel "
    "umbrella valley wagon yellow zipper anchor banana cactus dolphin engine falcon glacier hammer igloo "
    "jungle kettle lemon mirror nutmeg oyster parrot puzzle rocket sunset turtle violin walnut balloon "
    "blossom button cherry cookie copper desert feather ginger honey lantern meadow mountain notebook "
    "pillow pocket raccoon ribbon shadow spider summer thunder tomato velvet whisper winter wizard "
    "cat dog sun map cup hat box pen owl fox bee ant egg ink key jam oak sky toy web bat bed bus car cow day "
    "ear elf fan fig gem hen hut jar lid log mop mud net nut pan pig pot rat rug saw sea tea tin van wax yak zoo "
    "bell book cake coat door drum fish frog gate goat hill kite lake lamp leaf lion moon nest pear rain ring rose "
    "salt ship sock star tree wolf yarn bread chair clock crown daisy eagle flame grape horse juice knife melon "
    "mouse night paint piano queen robot snake sugar table tiger train whale zebra"
).split()


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _letter_in(rng: random.Random, text: str) -> str:
    """Mostly a letter of the text; sometimes any letter, so 0 is a possible count."""
    letters = sorted(set(text.replace(" ", "")))
    return rng.choice(letters) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")


class Strings(ExactAnswer):
    name = "strings"
    description = (
        "Reverse, uppercase, count or sort letters, take initials: short words at level 1, long words and "
        "sentences at level 2, sentences of up to 12 words at level 3."
    )
    levels = 3
    WITHOUT_QUOTES = "Write only the result, without quotes."

    def make(self, rng: random.Random, difficulty: int) -> Made:
        short = [word for word in WORDS if len(word) <= 5]
        long = [word for word in WORDS if len(word) >= 6]
        kind = rng.choice(
            {
                1: ["reverse", "upper", "count-word", "length"],
                2: ["reverse", "count-sentence", "sort-letters", "initials"],
                3: ["reverse-words", "count-sentence", "reverse-sentence", "initials"],
            }[difficulty]
        )
        word = rng.choice(short if difficulty == 1 else long)
        sentence = _sentence(rng, *{1: (3, 4), 2: (4, 6), 3: (8, 12)}[difficulty])
        if kind == "reverse":
            return _made(f'Write the word "{word}" backwards. {self.WITHOUT_QUOTES}', word[::-1])
        if kind == "upper":
            return _made(f'Write the word "{word}" in capital letters. {self.WITHOUT_QUOTES}', word.upper())
        if kind == "length":
            return _made(f'How many letters are in the word "{word}"? {NUMBER_ONLY}', len(word))
        if kind == "count-word":
            letter = _letter_in(rng, word)
            return _made(
                f'How many times does the letter "{letter}" appear in "{word}"? {NUMBER_ONLY}', word.count(letter)
            )
        if kind == "count-sentence":
            letter = _letter_in(rng, sentence)
            prompt = f'How many times does the letter "{letter}" appear in "{sentence}"? {NUMBER_ONLY}'
            return _made(prompt, sentence.count(letter))
        if kind == "sort-letters":
            prompt = f'Write the letters of "{word}" in alphabetical order, as one word. {self.WITHOUT_QUOTES}'
            return _made(prompt, "".join(sorted(word)))
        if kind == "initials":
            prompt = (
                f'Write the first letter of each word of "{sentence}", in order, as one word. {self.WITHOUT_QUOTES}'
            )
            return _made(prompt, "".join(part[0] for part in sentence.split()))
        if kind == "reverse-words":
            prompt = f'Write the words of "{sentence}" in reverse order. {self.WITHOUT_QUOTES}'
            return _made(prompt, " ".join(reversed(sentence.split())))
        sentence = _sentence(rng, 3, 5)  # reverse-sentence: letter by letter, kept short
        prompt = f'Write "{sentence}" backwards, letter by letter (spaces included). {self.WITHOUT_QUOTES}'
        return _made(prompt, sentence[::-1])


# ---------------------------------------------------------------------------------------------------
# word-problems: each topic gives (question, answer) for a level

NAMES = "Ana Ben Chen Dara Eli Fatima Gus Hana Ivan Jada Kofi Lena Mateo Nia Omar Priya".split()


def _apples(rng: random.Random, level: int) -> tuple[str, int]:
    name, friend = rng.sample(NAMES, 2)
    if level == 1:
        a, b = rng.randint(3, 20), rng.randint(2, 15)
        return f"{name} has {a} apples and buys {b} more. How many apples does {name} have now?", a + b
    if level == 2:
        a, b = rng.randint(10, 40), rng.randint(5, 30)
        c = rng.randint(1, a + b - 1)
        question = f"{name} has {a} apples, buys {b} more and gives {c} to {friend}. How many apples are left?"
        return question, a + b - c
    boxes, per_box, bag = rng.randint(3, 9), rng.randint(6, 24), rng.randint(3, 8)
    eaten, given = rng.randint(1, 5), rng.randint(2, 10)
    question = (
        f"{name} picks {boxes} boxes of {per_box} apples, eats {eaten}, gives {given} to {friend} and packs the "
        f"rest into bags of {bag}. How many bags can {name} fill completely?"
    )
    return question, (boxes * per_box - eaten - given) // bag


def _trains(rng: random.Random, level: int) -> tuple[str, int]:
    speed, hours = rng.randrange(40, 125, 5), rng.randint(2, 6)
    if level == 1:
        return f"A train travels at {speed} km/h for {hours} hours. How many kilometers does it cover?", speed * hours
    if level == 2:
        return f"A train covers {speed * hours} km at a steady {speed} km/h. How many hours does the trip take?", hours
    other = rng.randrange(40, 125, 5)
    question = (
        f"Two trains start {(speed + other) * hours} km apart and travel toward each other, one at {speed} km/h "
        f"and the other at {other} km/h. After how many hours do they meet?"
    )
    return question, hours


def _prices(rng: random.Random, level: int) -> tuple[str, int]:
    name = rng.choice(NAMES)
    count, price = rng.randint(2, 9), rng.randint(2, 12)
    if level == 1:
        return (
            f"{name} buys {count} notebooks at {price} dollars each. How many dollars does {name} spend?",
            count * price,
        )
    if level == 2:
        bill = next(bill for bill in (20, 50, 100, 200) if bill >= count * price)
        question = (
            f"{name} buys {count} notebooks at {price} dollars each and pays with a {bill}-dollar bill. "
            "How many dollars of change does the shop give back?"
        )
        return question, bill - count * price
    pens, pen_price = rng.randint(2, 9), rng.randint(1, 5)
    total = count * price + pens * pen_price
    discount = rng.randint(1, total // 4)
    bill = next(bill for bill in (20, 50, 100, 200) if bill >= total - discount)
    question = (
        f"{name} buys {count} notebooks at {price} dollars each and {pens} pens at {pen_price} dollars each, gets "
        f"{discount} dollars off the total and pays with a {bill}-dollar bill. How many dollars of change are due?"
    )
    return question, bill - total + discount


def _ages(rng: random.Random, level: int) -> tuple[str, int]:
    first, second, third = rng.sample(NAMES, 3)
    age, older = rng.randint(4, 40), rng.randint(1, 30)
    if level == 1:
        return f"{first} is {age} years old. {second} is {older} years older. How old is {second}?", age + older
    if level == 2:
        later = rng.randint(2, 20)
        question = (
            f"{first} is {age} years old. {second} is {older} years older. How old will {second} be in {later} years?"
        )
        return question, age + older + later
    times = rng.randint(2, 4)
    younger = rng.randint(1, times * age - 1)
    question = (
        f"{first} is {age} years old. {second} is {times} times as old as {first}, and {third} is {younger} years "
        f"younger than {second}. What is the sum of their three ages?"
    )
    return question, age + times * age + (times * age - younger)


def _gardens(rng: random.Random, level: int) -> tuple[str, int]:
    length, width = rng.randint(3, 30), rng.randint(2, 20)
    garden = f"A rectangular garden is {length} m long and {width} m wide."
    if level == 1:
        return f"{garden} What is its area in square meters?", length * width
    if level == 2:
        return f"{garden} How many meters of fence go all the way around it?", 2 * (length + width)
    gate, cost = rng.randint(1, 2), rng.randint(3, 15)
    question = (
        f"{garden} Fencing costs {cost} dollars per meter, and a {gate} m gate in the fence needs no fencing. "
        "How many dollars does the fencing cost?"
    )
    return question, (2 * (length + width) - gate) * cost


WORD_PROBLEMS: dict[str, Callable[[random.Random, int], tuple[str, int]]] = {
    "apples": _apples,
    "trains": _trains,
    "prices": _prices,
    "ages": _ages,
    "gardens": _gardens,
}


class WordProblems(ExactAnswer):
    name = "word-problems"
    description = (
        "Word problems (apples, trains, prices, ages, gardens) with a whole-number answer: one step at "
        "level 1, two at level 2, three at level 3."
    )
    levels = 3

    def make(self, rng: random.Random, difficulty: int) -> Made:
        topic = rng.choice(sorted(WORD_PROBLEMS))
        question, answer = WORD_PROBLEMS[topic](rng, difficulty)
        return _made(f"{question} {NUMBER_ONLY}", answer, {"topic": topic})


# ---------------------------------------------------------------------------------------------------
# logic: knights and knaves, kept only when exactly one assignment of roles is consistent

Roles = tuple[bool, ...]  # True: knight
Claim = tuple[str, Callable[[Roles], bool]]  # what a speaker says, and when it is true


def _claims(speaker: int, people: int) -> list[Claim]:
    """Every statement `speaker` may make about the group (letters name the people; "I" is the speaker)."""
    claims: list[Claim] = []
    others = [p for p in range(people) if p != speaker]
    letter = "ABCD"
    for x in others:
        claims.append((f"{letter[x]} is a knight.", lambda r, x=x: r[x]))
        claims.append((f"{letter[x]} is a knave.", lambda r, x=x: not r[x]))
        claims.append((f"{letter[x]} and I are the same kind.", lambda r, x=x: r[x] == r[speaker]))
        claims.append((f"{letter[x]} and I are different kinds.", lambda r, x=x: r[x] != r[speaker]))
    for count in range(people + 1):
        text = {0: "None of us are knights.", 1: "Exactly one of us is a knight.", people: "All of us are knights."}
        claim = text.get(count, f"Exactly {count} of us are knights.")
        claims.append((claim, lambda r, c=count: sum(r) == c))
    claims.append(("At least one of us is a knave.", lambda r: not all(r)))
    for i, x in enumerate(others):
        for y in others[i + 1 :]:
            pair = f"{letter[x]} and {letter[y]}"
            claims.append((f"{pair} are both knights.", lambda r, x=x, y=y: r[x] and r[y]))
            claims.append((f"{pair} are both knaves.", lambda r, x=x, y=y: not r[x] and not r[y]))
            claims.append((f"At least one of {pair} is a knight.", lambda r, x=x, y=y: r[x] or r[y]))
            claims.append((f"At least one of {pair} is a knave.", lambda r, x=x, y=y: not r[x] or not r[y]))
    return claims


def _consistent(said: list[Claim], people: int) -> list[Roles]:
    """All role assignments under which knights' claims are true and knaves' false (brute force)."""
    found = []
    for code in range(2**people):
        roles = tuple(bool(code >> (people - 1 - p) & 1) for p in range(people))
        if all(claim(roles) == roles[p] for p, (_, claim) in enumerate(said)):
            found.append(roles)
    return found


def _roles_text(roles: Roles) -> str:
    return ", ".join(f"{'ABCD'[p]}={'knight' if knight else 'knave'}" for p, knight in enumerate(roles))


class Logic(ExactAnswer):
    name = "logic"
    description = (
        "Knights and knaves with exactly one solution: 2 people at level 1, 3 at level 2, 4 at level 3; "
        "answer A=knight, B=knave."
    )
    levels = 3
    ROLES = re.compile(r"[A-D]=(?:knight|knave)(?:, [A-D]=(?:knight|knave))*")

    def make(self, rng: random.Random, difficulty: int) -> Made:
        people = difficulty + 1
        options = [_claims(speaker, people) for speaker in range(people)]
        while True:  # a few percent of random draws have a unique solution at 4 people; each try is cheap
            said = [rng.choice(options[speaker]) for speaker in range(people)]
            solutions = _consistent(said, people)
            if len(solutions) == 1:
                break
        names = ", ".join("ABCD"[:people][:-1]) + f" and {'ABCD'[people - 1]}"
        lines = " ".join(f'{"ABCD"[p]} says: "{text}"' for p, (text, _) in enumerate(said))
        prompt = (
            f"On an island, knights always tell the truth and knaves always lie. You meet {names}. {lines} "
            "Who is a knight and who is a knave? Write NAME=knight or NAME=knave for each of them, in alphabetical "
            "order, separated by a comma and a space."
        )
        answer = _roles_text(solutions[0])
        return _made(prompt, answer, {"statements": [text for text, _ in said]})

    def check(self, task: Task, answer: str) -> Verdict:
        verdict = super().check(task, answer)
        if verdict.reward == 0 and isinstance(answer, str) and not self.ROLES.fullmatch(answer):
            return Verdict(0.0, f"not in the form A=knight, B=knave: {_quoted(answer)}")
        return verdict


# ---------------------------------------------------------------------------------------------------
# sequence: the next term; a sequence that two rules continue differently is never asked

RULES = (
    "The rule is one of: a constant difference, a constant ratio, a constant second difference, each term the sum "
    "of the two before it, or two alternating sequences each with a constant difference."
)


def _constant(values: list[Any]) -> bool:
    return all(value == values[0] for value in values)


def _differences(terms: list[int]) -> list[int]:
    return [b - a for a, b in zip(terms, terms[1:], strict=False)]


def _continuations(terms: list[int]) -> set[Fraction]:
    """The next term under every rule family the terms fit (a well-posed question has exactly one)."""
    found: set[Fraction] = set()
    first = _differences(terms)
    if _constant(first):
        found.add(Fraction(terms[-1] + first[0]))
    if all(terms) and _constant([Fraction(b, a) for a, b in zip(terms, terms[1:], strict=False)]):
        found.add(Fraction(terms[1], terms[0]) * terms[-1])
    second = _differences(first)
    if _constant(second):
        found.add(Fraction(terms[-1] + first[-1] + second[0]))
    if all(terms[k] == terms[k - 1] + terms[k - 2] for k in range(2, len(terms))):
        found.add(Fraction(terms[-1] + terms[-2]))
    evens, odds = _differences(terms[0::2]), _differences(terms[1::2])
    if _constant(evens) and _constant(odds) and len(terms) >= 6:
        found.add(Fraction(terms[-2] + (evens[0] if len(terms) % 2 == 0 else odds[0])))
    return found


class Sequence(ExactAnswer):
    name = "sequence"
    description = (
        "Next term of a sequence: constant difference at level 1, difference or ratio at level 2, "
        "second difference, Fibonacci-like or interleaved at level 3."
    )
    levels = 3

    def make(self, rng: random.Random, difficulty: int) -> Made:
        kinds = {1: ["arithmetic"], 2: ["arithmetic", "geometric"], 3: ["quadratic", "fibonacci", "interleaved"]}
        kind = rng.choice(kinds[difficulty])
        while True:  # the rare sequence two rules continue differently is drawn again
            terms = self._terms(rng, kind, difficulty)
            if len(_continuations(terms[:-1])) == 1:
                break
        prompt = f"What number comes next: {_join(terms[:-1])}, ...? {RULES} {NUMBER_ONLY}"
        return _made(prompt, terms[-1], {"rule": kind})

    @staticmethod
    def _terms(rng: random.Random, kind: str, difficulty: int) -> list[int]:
        """Shown terms plus the next one."""
        if kind == "arithmetic" and difficulty == 1:
            start, step = rng.randint(0, 50), rng.randint(1, 9)
            return [start + step * n for n in range(6)]
        if kind == "arithmetic":
            start, step = rng.randint(-50, 50), rng.choice([s for s in range(-15, 16) if s])
            return [start + step * n for n in range(6)]
        if kind == "geometric":
            start, ratio = rng.choice([s for s in range(-12, 13) if s]), rng.choice([-3, -2, 2, 3, 4, 5])
            return [start * ratio**n for n in range(6)]
        if kind == "quadratic":
            a, b, c = rng.choice([-3, -2, -1, 1, 2, 3]), rng.randint(-10, 10), rng.randint(-20, 20)
            return [a * n * n + b * n + c for n in range(7)]
        if kind == "fibonacci":
            terms = [rng.randint(1, 12), rng.randint(1, 12)]
            while len(terms) < 8:
                terms.append(terms[-1] + terms[-2])
            return terms
        starts, steps = [rng.randint(-20, 20) for _ in range(2)], [rng.randint(-9, 9) for _ in range(2)]
        return [starts[n % 2] + steps[n % 2] * (n // 2) for n in range(9)]


ENVIRONMENTS: list[type[Environment]] = [Arithmetic, Countdown, ListOps, Strings, WordProblems, Logic, Sequence]
