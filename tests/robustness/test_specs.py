"""Bad specs through the installed script: one located line, a hint, exit 2, no model loaded.

The checkpoint given does not exist: an error about the spec proves the spec was checked first.
"""

from __future__ import annotations

import re

import pytest

from tests.scripts import run_refq

BAD = {
    # fnmatch translates brackets in quadratic time: 20,000 of them took 15 s
    "long-glob": (
        b'version: 1\nrules:\n  - match: "' + b"[" * 20_000 + b'"\n',
        r"q.yaml:3:12: match is a glob of 20000 characters; at most 1000",
    ),
    "long-weight-glob": (
        b"version: 1\nrules:\n  - match: x\n    weights:\n      ? "
        + b"a" * 2000
        + b"\n      : {}\n",
        r"q.yaml:5:9: weights key 'a+\.\.\.a+' is a glob of 2000 characters",
    ),
    # composing 2 million nodes before counting them took a minute and 1.5 GB
    "two-million-values": (
        b"version: 1\nrules: [" + b"1," * 2_000_000 + b"1]\n",
        r"q.yaml:2:\d+: the spec has more than 100000 values",
    ),
    "syntax": (b"version: 1\ndefaults: {dtype: qint8\n", r"q.yaml:3:1: YAML syntax error"),
    "tab": (b"version: 1\ndefaults:\n\tdtype: qint8\n", r"q.yaml:3:1: YAML syntax error"),
    "duplicate-key": (
        b"version: 1\nversion: 1\n",
        r"q.yaml:2:1: duplicate key 'version' \(first given at q.yaml:1:1\)",
    ),
    "unknown-key": (
        b"version: 1\nrulez: []\n",
        r"q.yaml:2:1: unknown key 'rulez' in the spec; "
        r"did you mean 'rules'\?",
    ),
    "wrong-type": (
        b"version: 1\ndefaults: {percentile: high}\n",
        r"q.yaml:2:24: percentile must be a number, got 'high'",
    ),
    "python-tag": (
        b"version: 1\ndefaults: !!python/object/apply:os.system ['touch x']\n",
        r"q.yaml:2:11: defaults must be a mapping",
    ),
    "alias-bomb": (
        b"version: 1\ndefaults:\n  scale: [&a [1, 1, 1], &b [*a, *a, *a], [*b, *b]]\n",
        r"q.yaml:3:11: expected a single value here",
    ),
    "empty": (b"", r"q.yaml:1:1: the spec is empty; it needs at least 'version: 1'"),
    "not-utf8": (b"version: 1\n# \xff\xfe\n", r"q.yaml:2:1: the spec is not UTF-8 text"),
    "negative-scale": (
        b"version: 1\ndefaults: {observer: fixed, scale: -1, zero_point: 0}\n",
        r"q.yaml:2:36: scale must be greater than 0, got -1",
    ),
    "zero-scale": (
        b"version: 1\ndefaults: {observer: fixed, scale: 0.0, zero_point: 0}\n",
        r"q.yaml:2:36: scale must be greater than 0",
    ),
    "nan-scale": (
        b"version: 1\ndefaults: {observer: fixed, scale: .nan, zero_point: 0}\n",
        r"q.yaml:2:36: scale must be a finite number",
    ),
    "bad-axis": (b"version: 1\ndefaults: {axis: -1}\n", r"q.yaml:2:18: axis must be at least 0"),
}


def run(tmp_path, content):
    spec = tmp_path / "q.yaml"
    spec.write_bytes(content)
    return run_refq("convert", tmp_path / "no-such-model.pt", "-q", "q.yaml", cwd=tmp_path)


@pytest.mark.parametrize(("content", "pattern"), BAD.values(), ids=BAD.keys())
def test_bad_specs_are_refused_before_any_model_is_read(tmp_path, content, pattern):
    result = run(tmp_path, content)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "x").exists()


def test_a_fifty_megabyte_spec_is_refused_reading_no_more_than_the_limit(tmp_path):
    big = tmp_path / "q.yaml"
    with big.open("wb") as f:
        f.write(b"version: 1\n")
        f.truncate(50 * 1024 * 1024)
    result = run_refq("convert", tmp_path / "no-such-model.pt", "-q", "q.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "q.yaml: too large for a spec (limit 4,194,304 bytes)" in result.stderr
