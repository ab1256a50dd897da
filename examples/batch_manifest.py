"""Run the CI example's manifest from Python: every job, one shard of four at a time.

``refq_cli.batch`` does what ``refq batch`` does, without printing: each job's result comes
back as a record (status, output, worst SQNR, gate), and a job that fails does not stop the
others. Artifacts already up to date are skipped, so the script can be run again.
"""

from __future__ import annotations

from pathlib import Path

import refq_cli

MANIFEST = Path(__file__).parent / "ci" / "manifest.yaml"


def main() -> None:
    results = []
    for k in range(1, 5):
        results += refq_cli.batch(MANIFEST, shard=f"{k}/4", skip_unchanged=True)
    for r in results:
        sqnr = "exact" if r.worst_sqnr_db is None else f"{r.worst_sqnr_db:.1f} dB"
        print(f"{r.status:9} {r.input} -> {r.output} (worst {sqnr})")
    failed = [r for r in results if r.exit_code]
    print(f"jobs: {len(results)}, failed: {len(failed)}")


if __name__ == "__main__":
    main()
