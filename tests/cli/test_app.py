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
