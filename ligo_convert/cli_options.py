"""Click options several commands share, defined once so their names and help stay the same everywhere."""

from __future__ import annotations

import click

_TARGET_SIZES = [
    click.option("--layers", type=int, help="Target layers (overrides DST)."),
    click.option("--width", type=int, help="Target hidden size; heads and MLP scale with it unless given."),
    click.option("--heads", type=int, help="Target attention heads (head_dim stays the source's)."),
    click.option("--kv-heads", type=int, help="Target key/value heads (grouped-query attention)."),
    click.option("--mlp", type=int, help="Target MLP (intermediate) size."),
]


def target_sizes(command):
    """--layers, --width, --heads, --kv-heads, --mlp: the target's sizes over DST's (grow, compare)."""
    for option in reversed(_TARGET_SIZES):
        command = option(command)
    return command


def tower(command):
    """--tower: the tower of a composite checkpoint (CLIPModel) to read (inspect, convert, export, eval)."""
    return click.option("--tower", metavar="NAME",
                        help="Read one tower of a composite checkpoint (CLIPModel: vision or text).")(command)
