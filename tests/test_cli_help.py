"""``--help`` of every command and command group is readable in an 80-column terminal.

Rich's option table (typer's default) cut option names at 80 columns ("--max-train-per…") and
squeezed the help into a narrow column; the CLI renders plain click help instead
(:data:`dicom_covid.cli._app.HELP_MARKUP`, :class:`dicom_covid.cli._app.HelpGroup`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from dicom_covid.cli.main import app

runner = CliRunner()


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group under ``cmd`` with its argument path, the root first."""
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(get_command(app)))


def test_every_command_is_checked() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "predict", "serve", "crossval", "crossval run", "lungs heat-share"} <= names
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(
    ("path", "cmd"), COMMANDS, ids=[" ".join(p) or "dicom-covid" for p, _ in COMMANDS]
)
def test_help_is_readable_at_80_columns(path: tuple[str, ...], cmd: Any) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "…" not in text, f"something is cut short:\n{text}"
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    for param in cmd.params:
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("--"):
                assert opt in text, f"{opt} is not shown whole:\n{text}"
    # A group lists every command with its whole first sentence (click cuts it with "...").
    for name, sub in getattr(cmd, "commands", {}).items():
        assert name in text
        assert sub.get_short_help_str(limit=10_000).split()[-1] in text, name
