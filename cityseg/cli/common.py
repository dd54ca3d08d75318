"""What every command shares: the app, the consoles, one-line errors, and which options the user gave.

Rich markup is off on both consoles: paths and file names reach them as given (a `[tag]` in a name is
printed, not interpreted); styling goes through `Text` and `style=`, never through markup.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer._click.core import Context, ParameterSource
from typer._click.exceptions import ClickException
from typer.core import TyperGroup

from cityseg.errors import InterruptedNow, UserError, capped, signals_raise
from cityseg.outputs import path_error

console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)


def print_error(message: str) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", capped(message)), soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit: bad input is the user's to fix, not a traceback."""
    print_error(message)
    raise typer.Exit(code)


class OneLineErrors(TyperGroup):
    """Usage errors (a bad flag, a missing option, a value of the wrong type) and every `UserError`
    print as one `error: ...` line and exit 2; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: Context) -> Any:
        try:
            with signals_raise():  # SIGTERM as Ctrl-C: one line and 143 (130), never a silent death
                return super().invoke(ctx)
        except KeyboardInterrupt as e:
            err_console.print("interrupted")
            raise typer.Exit(e.exit_code if isinstance(e, InterruptedNow) else 130) from None
        except UserError as e:
            fail(str(e))
        except OSError as e:  # a path the OS refuses outright (too long), wherever it was opened
            if path_error(e) is None:
                raise
            fail(path_error(e))

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.pop("standalone_mode", True)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as e:
            hint = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) is not None else ""
            print_error(e.format_message().replace("\n", " ") + hint)
            code = e.exit_code
        if not standalone:
            return code
        sys.exit(code or 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Fast U-Net training for Cityscapes-style street-scene segmentation (DALI + Triton + PyTorch).",
)


def given_options(ctx: Context) -> dict[str, Any]:
    """The options the user typed (not the ones left at their defaults), by parameter name."""
    return {name: value for name, value in ctx.params.items()
            if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}
