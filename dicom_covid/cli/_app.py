"""The typer application every command module registers on."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

#: ``rich_markup_mode`` of every ``typer.Typer`` of the CLI. ``None`` renders ``--help`` as plain
#: click text, which wraps to the terminal and never cuts an option name; Rich's option table cut
#: names ("--max-train-per…") and squeezed the help into a narrow column at 80 columns.
HELP_MARKUP = None


class HelpGroup(TyperGroup):
    """A command group whose ``--help`` lists each command's first sentence whole, wrapped.

    Click's default cuts a command's summary to one line ("Compare evaluated models side by
    side: markdown table,..."); every ``typer.Typer`` of the CLI passes ``cls=HelpGroup``.
    """

    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    name="dicom-covid",
    help=(
        "Screen chest X-rays for COVID-19 inside a PACS workflow. "
        "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode=HELP_MARKUP,
    cls=HelpGroup,
)
