"""The root ``refq`` app. Commands are wired here, one module each, and errors are mapped here.

Nothing imported at module level may import torch: ``refq --help`` must stay instant.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import IO, Annotated, Any

import typer

from refq_cli import __version__
from refq_cli.cli.batch import batch_command
from refq_cli.cli.convert import convert_command
from refq_cli.cli.converters import converters_command
from refq_cli.cli.init_config import init_config_command
from refq_cli.cli.inspect import inspect_command
from refq_cli.cli.schema import schema_command
from refq_cli.cli.verify import verify_command
from refq_cli.errors import RefqError, printable

app = typer.Typer(
    name="refq",
    help="Turn float PyTorch recurrent models into reference-quantized models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Warnings torch prints that say nothing to a refq user.
_TORCH_NOISE = (
    "Failed to initialize NumPy",
    "LSTM with projections is not supported with oneDNN",
    "dropout option adds dropout after all but last recurrent layer",
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
            with warnings.catch_warnings():
                for message in _TORCH_NOISE:
                    warnings.filterwarnings("ignore", message=message)
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
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print refq's version and exit.",
        ),
    ] = False,
) -> None:
    """Turn float PyTorch recurrent models into reference-quantized models."""


for _name, _command in {
    "convert": convert_command,
    "batch": batch_command,
    "inspect": inspect_command,
    "verify": verify_command,
    "init-config": init_config_command,
    "schema": schema_command,
    "converters": converters_command,
}.items():
    app.command(_name)(reporting_errors(_command))


class QuietPipe:
    """A standard stream that drops its output, quietly, once its reader has gone.

    Python ignores SIGPIPE, so writing into a pipe whose reader closed it (``refq schema | head
    -1``) raises BrokenPipeError: out of click's echo (then "refq: internal error"), out of rich's
    print (which exits 1), or at exit, out of Python's last flush ("Exception ignored", exit 120).
    Through this wrapper the first such error points the stream's descriptor at /dev/null instead:
    the command goes on with its work, its output lost, and exits with the code that work earns.
    Everything else goes to the stream itself, its ``buffer`` (where click writes bytes, and
    where it reads from when it re-wraps a stream it finds misconfigured) wrapped the same way.
    """

    def __init__(self, stream: IO[Any]) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @property
    def buffer(self) -> QuietPipe:
        return QuietPipe(self._stream.buffer)  # type: ignore[attr-defined]

    def write(self, data: Any) -> int:
        try:
            return self._stream.write(data)
        except OSError as exc:
            self._drop_output(exc)
            return len(data)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._drop_output(exc)

    def _drop_output(self, exc: OSError) -> None:
        """Re-raise ``exc`` unless it says the pipe is broken; if it does, write to /dev/null
        from now on (what is still buffered too, so Python's flush at exit succeeds)."""
        if exc.errno != errno.EPIPE:
            raise exc
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError):  # no descriptor: each write fails, dropped
            os.dup2(devnull, self._stream.fileno())
        os.close(devnull)


def main() -> None:
    """Console-script entry point: the app, with its standard streams :class:`QuietPipe`."""
    # PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when
    # this is set before torch loads (and the kernel allows it): one page fault per 2 MB instead
    # of per 4 kB. oneDNN's per-call copies of the recurrent weights and the fake-quantized
    # weights are such tensors; conversions take about a sixth less time with it.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    streams = sys.stdout, sys.stderr
    quiet = [None if stream is None else QuietPipe(stream) for stream in streams]
    sys.stdout, sys.stderr = quiet  # type: ignore[assignment]
    try:
        app()
    finally:
        # A pipe that broke since the last flush shows here, in time to point it at /dev/null.
        # Any other error Python's own flush at exit reports, as it would without the wrapper.
        for stream in quiet:
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.flush()
        sys.stdout, sys.stderr = streams
