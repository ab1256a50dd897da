"""README's code runs as written, on the bundled files.

Its code blocks are taken in order, in a copy of ``examples/`` and ``configs/``: each line of a
plain block is a shell command (``make`` ones aside: the Quickstart's), a YAML block is the file
the text after it saves it as (``manifest.yaml`` for a manifest, else ``q.yaml``), and a Python
block is a script. Each must succeed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def blocks() -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def test_readme_has_the_blocks_this_test_runs():
    kinds = [kind for kind, _ in blocks()]
    assert kinds.count("yaml") == 2 and kinds.count("python") >= 3 and kinds.count("") >= 3


@pytest.fixture
def sandbox(tmp_path):
    for folder in ("examples", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("out"))
    return tmp_path


def test_every_command_spec_and_script_in_readme_runs(sandbox):
    refq = Path(sys.executable).parent / "refq"
    if not refq.exists():
        pytest.skip("the refq script is not installed beside this Python")
    env = {**os.environ, "PATH": f"{refq.parent}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    env.pop("REFQ_DEBUG", None)
    ran = 0
    for kind, text in blocks():
        if kind == "yaml":
            name = "manifest.yaml" if re.search(r"^jobs:", text, re.M) else "q.yaml"
            (sandbox / name).write_text(text)
            continue
        if kind == "python":
            commands = [[sys.executable, "-c", text]]
        elif kind == "":
            lines = [line for line in text.splitlines() if line.strip()]
            commands = [["bash", "-c", line] for line in lines if not line.startswith("make ")]
        else:
            continue
        for command in commands:
            run = subprocess.run(command, cwd=sandbox, env=env, capture_output=True, text=True)
            assert run.returncode == 0, f"{command[-1]}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
            ran += 1
    assert ran >= 14
    assert (sandbox / "out" / "custom.refq.safetensors").is_file()  # the spec's block converted
    assert (sandbox / "out" / "batch" / "gated.refq.safetensors").is_file()  # and the manifest's
