"""A tiny, safe arithmetic evaluator for descriptor defaults such as ``"width // heads"`` or ``"pad_token_id + 1"``.

Descriptors are data, so we never ``eval`` them: only names, numbers and + - * // / are accepted.
"""

from __future__ import annotations

import ast
import operator

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Div: operator.truediv,
}


class Unresolved(Exception):
    """The expression names a value that is not known (yet)."""


def evaluate(expr: str, names: dict):
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            value = names.get(node.id)
            if value is None:
                raise Unresolved(node.id)
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))
