"""Numeric options checked alike on every command: counts, sizes, rates and tolerances, refused with the flag
named before any work starts (a NaN learning rate or a -1-layer target would otherwise run, or be written)."""

from __future__ import annotations

import math

from .errors import LigoError

# kind -> (test, what the value must be)
KINDS = {
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number, 0 or more"),
    "size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number, 1 or more"),
    "positive": (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0, "a finite number above 0"),
    "nonnegative": (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                    "a finite number, 0 or more"),
}


def check(**options: tuple[object, str]) -> None:
    """``check(steps=(steps, "count"), lr=(lr, "positive"))``: each value that is not None must be of its kind.
    Raises LigoError naming the flag (``--batch-size`` for ``batch_size``)."""
    for name, (value, kind) in options.items():
        if value is None:
            continue
        test, wanted = KINDS[kind]
        if not test(value):
            raise LigoError(f"--{name.replace('_', '-')} must be {wanted}, not {value!r}")
