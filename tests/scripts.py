"""Running the installed ``refq`` console script, as users do."""

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
