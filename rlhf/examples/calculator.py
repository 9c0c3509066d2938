"""A calculator tool for ``--tools rlhf/examples/calculator.py:calculator`` (or
``rlhf.examples.calculator:calculator``), with the prompt set ``rlhf/data/calculator_train.jsonl``
(arithmetic questions, a ``solution`` column for the ``exact_answer`` reward).

The expression is parsed, never ``eval``'d: numbers, + - * / // % **, unary minus and
parentheses only, computed exactly with fractions.
"""

from __future__ import annotations

import ast
import operator
from fractions import Fraction

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_LARGEST_EXPONENT = 64  # 10**64 is fine, 10**10**10 must not hang the rollout


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _value(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and (right.denominator != 1 or abs(right) > _LARGEST_EXPONENT):
            raise ValueError(f"exponents must be whole numbers up to {_LARGEST_EXPONENT}")
        return Fraction(_BINARY[type(node.op)](left, right))
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:40]}")


def _format(value: Fraction) -> str:
    """An integer as is, a terminating decimal as a decimal, anything else as a/b."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:
        return format(value.numerator / value.denominator, ".15g")
    return f"{value.numerator}/{value.denominator}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: The expression to evaluate, with numbers, + - * / // % ** and parentheses, e.g. "(12 + 30) * 7".

    Returns:
        The exact result: an integer, a decimal, or a fraction a/b.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return _format(_value(tree))
