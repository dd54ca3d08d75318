"""What every command shares: the app, the consoles, one-line errors, and which options the user gave.

Rich markup is off on both consoles: paths and file names reach them as given (a `[tag]` in a name is
printed, not interpreted); styling goes through `Text` and `style=`, never through markup.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
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


@contextlib.contextmanager
def thread_errors_in_one_line() -> Iterator[None]:
    """A background thread's OSError (a full disk under TensorBoard's event writer) is no traceback:
    a thread that keeps it for its owner (`thread.exception`, re-raised in the main thread, which
    names the file) stays silent; another gets one note. Anything else is a bug: traceback kept."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is None or not issubclass(args.exc_type, OSError):
            default(args)
        elif getattr(args.thread, "exception", None) is not args.exc_value:
            name = args.thread.name if args.thread is not None else "?"
            err_console.print(f"note: background thread {name} stopped: {capped(str(args.exc_value))}", soft_wrap=True)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = default


class OneLineErrors(TyperGroup):
    """Usage errors (a bad flag, a missing option, a value of the wrong type) and every `UserError`
    print as one `error: ...` line and exit 2; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: Context) -> Any:
        try:
            # SIGTERM as Ctrl-C: one line and 143 (130), never a silent death
            with signals_raise(), thread_errors_in_one_line():
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
        tidy_help(self)
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


# Choice lists longer than this show as a placeholder in the type column, their values in the help
# text: the type column is narrow, and a long list there broke mid-word at 80 columns.
MAX_CHOICE_LABEL = 16
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # `-h` on every command (subcommands inherit it)


def tidy_help(command: Any) -> None:
    """Make every command's help read right, once: help texts are escaped (they go through Rich
    markup, which took `[data]` for a style tag and dropped it), on/off flags show no value
    placeholder, and a long choice list moves from the narrow type column into the help text."""
    if getattr(command, "_help_tidied", False):
        return
    command._help_tidied = True
    if command.help:
        command.help = escape(command.help)
    make_help_option = command.get_help_option  # built per invocation, not one of `params`

    def get_help_option(ctx: Context) -> Any:
        option = make_help_option(ctx)
        if option is not None:
            tidy_param(option)
        return option

    command.get_help_option = get_help_option
    for param in command.params:
        tidy_param(param)
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)


def tidy_param(param: Any) -> None:
    help_text = getattr(param, "help", None) or ""
    descriptor = getattr(param, "type_descriptor", None)
    if getattr(param, "is_flag", False):
        param.metavar = ""  # a switch takes no value
    elif descriptor is not None and descriptor.is_list and not descriptor.is_choice and param.metavar is None:
        # `<list[Path]>` is Python, not usage: each value is a path (the name already ends in "...")
        element = f"<{param.bare_type().removeprefix('list[').removesuffix(']').lower()}>"
        param.display_type_rich = lambda ctx: element  # noqa: ARG005
    elif descriptor is not None and descriptor.is_choice and param.metavar is None:
        values = [getattr(c, "value", c) for c in descriptor.choices]
        if len("|".join(values)) + 2 > MAX_CHOICE_LABEL:
            param.metavar = "<choice>"
            help_text = f"{help_text} One of: {', '.join(values)}.".strip()
    if hasattr(param, "help"):
        param.help = escape(help_text) if help_text else param.help


app = typer.Typer(
    cls=OneLineErrors,
    context_settings=HELP_OPTIONS,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Fast U-Net training for Cityscapes-style street-scene segmentation (DALI + Triton + PyTorch).",
)


def given_options(ctx: Context) -> dict[str, Any]:
    """The options the user typed (not the ones left at their defaults), by parameter name."""
    return {name: value for name, value in ctx.params.items()
            if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}
