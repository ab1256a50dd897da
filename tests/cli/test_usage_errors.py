"""Usage errors (a missing argument, an unknown option or command) are one line with exit 2,
like every other error: they were click's multi-line box."""

from __future__ import annotations

import pytest

from tests.scripts import run_refq


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["convert"], "refq convert: Missing argument 'CHECKPOINT'"),
        (["convert", "m.pt", "--bogus"], "refq convert: No such option: --bogus"),
        (["convert", "-q"], "refq convert: Option '-q' requires an argument"),
        (["nosuch"], "refq: No such command 'nosuch'"),
        (["batch"], "refq batch: Missing argument 'MANIFEST'"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_command_and_its_help(args, line):
    result = run_refq(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    command = line.split(":")[0]
    assert result.stderr.startswith(f"refq: error: {line}")
    assert result.stderr.endswith(f"; '{command} --help' lists the options\n")


def test_no_arguments_shows_the_help_alone():
    result = run_refq()
    assert result.returncode == 2 and "Commands" in result.stdout and result.stderr == ""


def test_commands_still_exit_with_their_own_codes(tmp_path):
    assert run_refq("--version").returncode == 0
    assert run_refq("inspect", tmp_path / "missing.refq.safetensors").returncode == 2
