"""`python -m raylt` is the `raylt` command."""

from raylt.cli import command

command()
