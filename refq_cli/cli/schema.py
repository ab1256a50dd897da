"""``refq schema``: the spec's JSON Schema, for editors."""

from __future__ import annotations

import json


def schema_command() -> None:
    """Print the JSON Schema of the YAML spec (point editors at it with yaml-language-server)."""
    from refq_cli.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
