"""`calculator`: a multi-turn environment where the model may call a calculator tool.

The task is arithmetic too long to do reliably in one's head (4-digit products plus a sum; at
level 3 a word problem to turn into an expression). On any turn the model may reply exactly

    <tool>calculator: EXPRESSION</tool>

(optionally after one <think> block) and the environment answers `<result>VALUE</result>` as the
next user message, or `<result>error: WHY</result>`. Any other reply is the final one, judged like
every environment's: `<answer>N</answer>`, exact integer. `max_turns` bounds the conversation: a
model still calling the tool on its last turn ends truncated with reward 0.

Using the tool is not required for the reward: a model that multiplies correctly in its head has
earned it, and the verifier sees only the final reply. The numbers are large enough that guessing
does not pay. The gold conversation (prompt, tool call, result, answer) is in
`Task.data["gold_transcript"]` for SFT; `Task.solution` is its final reply.

Expressions are evaluated by walking Python's `ast` (never `eval`): integers and decimals,
+ - * / // % ** and parentheses only, at most 200 characters, every intermediate value at most
10**30 in size and exponents at most 100, so `9**9**9` or `__import__('os')` are refused at once.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from typing import Any

from atomlab.envs.base import Environment, Task, answer_tag, user

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**30
MAX_EXPONENT = 100

# One optional <think> block, then exactly one tool call, only whitespace around them.
_TOOL_CALL = re.compile(
    r"\s*(?:<think>(?:(?!</?think>|</?tool>).)*</think>\s*)?<tool>\s*calculator\s*:((?:(?!</?tool>).)*)</tool>\s*",
    re.DOTALL,
)
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_SPELLINGS = {"×": "*", "·": "*", "÷": "/", "−": "-"}  # what people (and models) write for * / -


class CalculatorError(ValueError):
    pass


def _check(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("a value exceeds 10**30")
    return value


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if right != int(right) or not 0 <= right <= MAX_EXPONENT:
                raise CalculatorError(f"exponents must be whole numbers from 0 to {MAX_EXPONENT}")
            # refuse before computing what is surely too big: |left| >= 2 ** (bits - 1), and 2 ** 100 > 10**30
            if isinstance(left, int) and (left.bit_length() - 1) * int(right) >= 100:
                raise CalculatorError("a value exceeds 10**30")
        if isinstance(node.op, ast.Div) and isinstance(left, int) and isinstance(right, int) and right:
            if left % right == 0:
                return _check(left // right)  # exact quotients stay integers
        try:
            return _check(_OPERATORS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("a value exceeds 10**30") from None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise CalculatorError("^ is not a power here; use **")
    raise CalculatorError("only numbers, + - * / // % ** and parentheses are allowed")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, or CalculatorError saying why not."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expressions are limited to {MAX_EXPRESSION_CHARS} characters")
    for spelling, symbol in _SPELLINGS.items():
        expression = expression.replace(spelling, symbol)
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise CalculatorError("not a valid expression") from None
    return _evaluate(tree)


def format_value(value: int | float) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else format(value, ".12g")
    return str(value)


def tool_result(expression: str) -> str:
    try:
        return f"<result>{format_value(calculate(expression))}</result>"
    except CalculatorError as exc:
        return f"<result>error: {exc}</result>"


class Calculator(Environment):
    name = "calculator"
    description = "Multi-turn: big arithmetic with a calculator tool (<tool>calculator: EXPR</tool>), then <answer>."
    levels = 3
    max_turns = 6  # up to 5 tool calls, then the answer

    INSTRUCTIONS = (
        "You may use a calculator: reply with exactly <tool>calculator: EXPRESSION</tool> (numbers, "
        "+ - * / // % ** and parentheses) and the result comes back as <result>VALUE</result>. "
        "When you know the answer, reply with it in <answer></answer>."
    )

    def make(self, rng: random.Random, difficulty: int) -> tuple[str, str, str, dict[str, Any]]:
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        if difficulty == 1:
            c = rng.randint(100, 9999)
            question, expression = f"What is {a} × {b} + {c}?", f"{a} * {b} + {c}"
        elif difficulty == 2:
            c, d = rng.randint(1000, 9999), rng.randint(1000, 9999)
            question, expression = f"What is {a} × {b} − {c} × {d}?", f"{a} * {b} - {c} * {d}"
        else:
            shelves, boxes, items, shipped = rng.randint(100, 999), rng.randint(10, 99), a, rng.randint(1000, 99999)
            question = (
                f"A warehouse has {shelves} shelves with {boxes} boxes on each shelf, and every box holds "
                f"{items} items. Then {shipped} items are shipped out. How many items are left in the warehouse?"
            )
            expression = f"{shelves} * {boxes} * {items} - {shipped}"
        answer = format_value(calculate(expression))
        prompt = f"{question}\n{self.INSTRUCTIONS}"
        transcript = [
            user(prompt),
            {"role": "assistant", "content": f"<tool>calculator: {expression}</tool>"},
            user(f"<result>{answer}</result>"),
            {"role": "assistant", "content": answer_tag(answer)},
        ]
        return prompt, answer, answer_tag(answer), {"expression": expression, "gold_transcript": transcript}

    def reply(self, task: Task, messages: list[dict[str, str]]) -> str | None:
        match = _TOOL_CALL.fullmatch(messages[-1]["content"])
        if match is None:
            return None  # not a tool call: the final reply, to verify
        return tool_result(match.group(1))


ENVIRONMENTS: list[type[Environment]] = [Calculator]
