"""The root command: help, version, and staying light."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from refq_cli import __version__
from refq_cli.cli.app import app
from tests.scripts import run_and_check_torch, run_refq


def test_help_lists_the_tool():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "reference-quantized" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"refq {__version__}"


def test_installed_script_prints_version():
    result = run_refq("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"refq {__version__}"


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "refq_cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"refq {__version__}"


def test_unknown_option_is_a_usage_error():
    result = run_refq("--bogus")
    assert result.returncode == 2
    assert "--bogus" in result.stderr


def test_help_and_version_do_not_import_torch():
    output, imported_torch = run_and_check_torch(["--help"], ["--version"])
    assert "Usage" in output and __version__ in output and not imported_torch


@pytest.mark.parametrize("module", ["torch", "onnx"])
def test_export_help_imports_neither_torch_nor_onnx(module):
    output, imported = run_and_check_torch(["--help"], ["export", "--help"], module=module)
    assert "--opset" in output and not imported


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("0", "0")])
def test_the_script_asks_torch_for_huge_pages_unless_told_otherwise(monkeypatch, given, expected):
    from refq_cli.cli import app as app_module

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", given or "")  # restored after the test...
    if given is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")  # ...even when main() sets it
    seen = []
    monkeypatch.setattr(
        app_module, "app", lambda **_: seen.append(os.environ["THP_MEM_ALLOC_ENABLE"])
    )
    with pytest.raises(SystemExit) as exit_:
        app_module.main()
    assert seen == [expected] and exit_.value.code == 0


HELP_ENV = {"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}
SWITCHES = ("--help", "--version", "--force", "--quiet", "--json", "--trust-code,--trust-pickle")
SWITCHES += ("--list", "--skip-unchanged", "--fail-fast")


def option_rows(text: str) -> dict[str, str]:
    """The rows of a help's option tables, by the option's (long) name."""
    rows = {}
    for line in text.splitlines():
        words = line.strip("│ ").split()
        names = [w for w in words[:2] if w.startswith("--")]
        if names:
            rows[names[0]] = line
    return rows


@pytest.mark.parametrize(
    "words", [[], ["convert"], ["batch"], ["inspect"], ["verify"], ["init-config"], ["schema"]]
)
def test_switches_show_no_type_in_the_help(words):
    # Every switch said <bool> in the type column, --help and --version included.
    result = CliRunner().invoke(app, [*words, "--help"], env=HELP_ENV)
    assert result.exit_code == 0, result.output
    rows = option_rows(result.stdout)
    assert list(rows)[-1] == "--help"  # refq's own --help, last as click's was
    for name in SWITCHES:
        assert "<bool>" not in rows.get(name, ""), rows[name]


def test_no_help_shows_a_bool_type():
    for words in ([], ["convert"], ["batch"], ["inspect"], ["verify"], ["init-config"]):
        result = CliRunner().invoke(app, [*words, "--help"], env=HELP_ENV)
        assert "<bool>" not in result.stdout, words


def test_help_acts_first_and_exits_0_in_the_runner_and_the_script():
    for args in (["--help"], ["convert", "--help"], ["convert", "--force", "--help"], []):
        result = CliRunner().invoke(app, args, env=HELP_ENV)
        assert "Usage:" in result.stdout, (args, result.output)
        assert result.exit_code == (2 if not args else 0)  # no arguments: the help, exit 2
        real = run_refq(*args, env=HELP_ENV)
        assert (real.returncode, real.stdout) == (result.exit_code, result.stdout), args
    assert option_rows(real.stdout)["--help"].split() == [
        "│",
        "--help",
        "Show",
        "this",
        "message",
        "and",
        "exit.",
        "│",
    ]
    short = run_refq("convert", "-h", env=HELP_ENV)  # -h is no option of refq, as before
    assert short.returncode == 2 and "No such option: -h" in short.stderr
