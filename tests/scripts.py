"""Running ``refq`` in a process of its own: the installed console script, as users do, or
its entry point in a fresh Python that reports what it imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REFQ = Path(sys.executable).with_name("refq")


def run_refq(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``refq ARGS`` in a subprocess, text output captured; ``env`` adds to the environment."""
    return subprocess.run(
        [REFQ, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def run_and_check_torch(*argvs: list[str], module: str = "torch") -> tuple[str, bool]:
    """Run ``refq`` with each argv in turn in one fresh Python, as the script would; return the
    output and whether ``module`` (torch) got imported. A command that fails fails the calling
    test."""
    code = (
        "import sys\n"
        "from refq_cli.cli.app import main\n"
        f"for argv in {[[str(a) for a in argv] for argv in argvs]!r}:\n"
        "    sys.argv = ['refq', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), exit.code\n"
        f"print({module!r} in sys.modules)\n"
    )
    env = {**os.environ, "COLUMNS": "100"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    *lines, imported = result.stdout.strip().splitlines()
    return "\n".join(lines), imported == "True"
