"""The root ``refq`` app. Commands are wired here, one module each, and errors are mapped here.

Nothing imported at module level may import torch: ``refq --help`` must stay instant.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any

import typer

from refq_cli import __version__
from refq_cli.cli.batch import batch_command
from refq_cli.cli.convert import convert_command
from refq_cli.cli.converters import converters_command
from refq_cli.cli.export import export_command
from refq_cli.cli.init_config import init_config_command
from refq_cli.cli.inspect import inspect_command
from refq_cli.cli.options import Help, eager_flag
from refq_cli.cli.schema import schema_command
from refq_cli.cli.streams import QuietPipe
from refq_cli.cli.verify import verify_command
from refq_cli.errors import RefqError, ignore_torch_noise, naming_flags, printable

app = typer.Typer(
    name="refq",
    help="Turn float PyTorch recurrent models into reference-quantized models.",
    no_args_is_help=True,
    add_completion=False,
    add_help_option=False,  # refq's own --help (options.Help), without a <bool> beside it
    pretty_exceptions_enable=False,
)


def reporting_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Map refq's errors to one line on stderr and their exit code (2 bad input, 1 failed).

    Any other exception is a bug: one line too, and the traceback with REFQ_DEBUG=1. The line
    is :func:`~refq_cli.errors.printable`: escaped and of bounded length, whatever the message
    quotes.
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings(), naming_flags():
                ignore_torch_noise()
                return command(*args, **kwargs)
        except RefqError as exc:
            if os.environ.get("REFQ_DEBUG") == "1":
                raise
            typer.echo(f"refq: error: {printable(str(exc))}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("REFQ_DEBUG") == "1":
                raise
            typer.echo(
                f"refq: internal error: {printable(f'{type(exc).__name__}: {exc}')} "
                "(rerun with REFQ_DEBUG=1 for the traceback)",
                err=True,
            )
            raise typer.Exit(1) from None

    return run


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"refq {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        eager_flag("--version", help="Print refq's version and exit.", callback=_print_version),
    ] = False,
    show_help: Help = False,
) -> None:
    """Turn float PyTorch recurrent models into reference-quantized models."""


def with_help(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` taking refq's ``--help`` (:data:`refq_cli.cli.options.Help`) as its last
    option: the app's commands are made without click's, whose type column says ``<bool>``."""
    signature = inspect.signature(command, eval_str=True)
    extra = inspect.Parameter(
        "show_help", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Help
    )

    @functools.wraps(command)
    def run(*args: Any, show_help: bool = False, **kwargs: Any) -> Any:
        return command(*args, **kwargs)

    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), extra]
    )
    return run


COMMANDS = {
    "convert": convert_command,
    "batch": batch_command,
    "inspect": inspect_command,
    "verify": verify_command,
    "export": export_command,
    "init-config": init_config_command,
    "schema": schema_command,
    "converters": converters_command,
}
for _name, _command in COMMANDS.items():
    app.command(_name, add_help_option=False)(with_help(reporting_errors(_command)))


def main() -> None:
    """Console-script entry point: the app, with its standard streams :class:`QuietPipe`."""
    # PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when
    # this is set before torch loads (and the kernel allows it): one page fault per 2 MB instead
    # of per 4 kB. The fake-quantized weights of the probe's reference modules are such tensors
    # (`benchmarks/probe_cost.py` times the probe with and without it).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    streams = sys.stdout, sys.stderr
    quiet = [None if stream is None else QuietPipe(stream) for stream in streams]
    sys.stdout, sys.stderr = quiet  # type: ignore[assignment]
    try:
        code = _run()
    finally:
        # A pipe that broke since the last flush shows here, in time to point it at /dev/null.
        # Any other error Python's own flush at exit reports, as it would without the wrapper.
        for stream in quiet:
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.flush()
        sys.stdout, sys.stderr = streams
    sys.exit(code)


def _run() -> int:
    """The app's exit code; a usage error (a missing argument, an unknown option or command)
    is one line naming the command and where its options are listed, exit 2, like every other
    error, instead of click's box."""
    try:
        result = app(standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors, as Typer raises them
        ctx = getattr(exc, "ctx", None)
        named = next((a for a in sys.argv[1:] if a in COMMANDS), None)  # when click gives no ctx
        command = ctx.command_path if ctx else "refq" + (f" {named}" if named else "")
        message = printable(exc.format_message().rstrip("."))
        if not message:  # no arguments at all: the help, already shown, says it all
            return exc.exit_code
        typer.echo(
            f"refq: error: {command}: {message}; '{command} --help' lists the options", err=True
        )
        return exc.exit_code
    except typer.Abort:
        typer.echo("refq: aborted", err=True)
        return 1
    return result if isinstance(result, int) else 0
