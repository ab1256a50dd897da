"""JSON Schemas shipped with refq: ``output.schema.json`` is the one home of the shape of every
command's ``--json`` output (tests check real output against it)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def output_schema() -> dict[str, Any]:
    """The JSON Schema of ``--json`` output: ``$defs`` holds one definition per command."""
    return json.loads(resources.files(__package__).joinpath("output.schema.json").read_text())
