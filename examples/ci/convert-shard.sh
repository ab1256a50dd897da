#!/usr/bin/env bash
# Convert one CI job's shard of the checkpoints a manifest lists.
#   usage: examples/ci/convert-shard.sh K N [MANIFEST]
# Every shard K of N converts a fixed part (by input path, balanced by bytes), so N CI jobs convert
# every checkpoint exactly once. Outputs already up to date are skipped. The JSON and Markdown
# summaries go beside the artifacts (out/ci, or $REFQ_SUMMARY_DIR), written even when a job
# fails; the exit code is refq's (1: a job failed).
set -euo pipefail
shard="${1:?shard index K, from 1 to N}"
shards="${2:?shard count N}"
manifest="${3:-examples/ci/manifest.yaml}"
summaries="${REFQ_SUMMARY_DIR:-out/ci}"
mkdir -p "$summaries"

refq batch "$manifest" --shard "$shard/$shards" --list
refq batch "$manifest" --shard "$shard/$shards" --skip-unchanged \
  --summary-md "$summaries/refq-summary-$shard.md" --json > "$summaries/refq-summary-$shard.json"
