"""``python -m refq_cli``: the ``refq`` command where its script is not installed."""

from refq_cli.cli.app import main

main()
