"""refq as a wheel installs it, for benchmarks that time whole processes.

pip compiles a wheel's modules when it installs them; an editable install (``make install``)
compiles nothing, and where ``PYTHONDONTWRITEBYTECODE`` is set, as on this project's machines,
Python never writes the bytecode it compiles: every ``refq`` process would compile refq's modules
again (0.1 s of a conversion). Benchmarks call :func:`compile_refq` before they measure.
"""

from __future__ import annotations

import compileall
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_refq() -> None:
    """Write the bytecode of every module of ``refq_cli`` (py_compile writes it whatever
    ``PYTHONDONTWRITEBYTECODE`` says)."""
    if not compileall.compile_dir(ROOT / "refq_cli", quiet=1):
        raise SystemExit("could not compile refq_cli's modules")
