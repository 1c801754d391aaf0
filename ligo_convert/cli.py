"""The `ligo-convert` command line: parse, call the library, print.  User errors are one line on stderr, exit 2."""

from __future__ import annotations

import os
import sys

import click

from . import __version__
from .errors import LigoError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LigoError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ligo-convert")
def main():
    """Grow small pretrained transformers into larger ones with LiGO, in their family's own files."""


def run():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(prog_name="ligo-convert")


# Commands live in their own modules and register here.
# (each helper adds one import + add_command line below)
