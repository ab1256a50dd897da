"""The YAML reader under specs and manifests: file:line:column in every error, duplicate and
unknown keys, and the kinds of values fields take."""

from __future__ import annotations

import re

import pytest

from refq_cli.errors import RefqError
from refq_cli.spec.yaml_reader import (
    MAX_BYTES,
    Field,
    Loc,
    Setting,
    YamlReader,
    compose,
    read_document,
)


class DocError(RefqError):
    """The error type the reader is told to raise."""


FIELDS = {
    "name": Field("str", "A name."),
    "count": Field("int", "A count.", minimum=0),
    "ratio": Field("number", "A ratio.", minimum=0, maximum=1),
    "level": Field("number", "Above 50.", minimum=50, exclusive_minimum=True),
    "mode": Field("enum", "A mode.", ("fast", "slow")),
    "enabled": Field("bool", "A switch."),
    "scales": Field("numbers", "A number or a list of them."),
    "codes": Field("ints", "An integer or a list of them."),
}


def read(text, fields=FIELDS):
    """The settings of a document that is one mapping of ``fields``."""
    reader = YamlReader("doc.yaml", "document", DocError)
    return reader.settings(compose(text, "doc.yaml", "document", DocError), fields, "the top")


def fails(text, message, fields=FIELDS):
    with pytest.raises(DocError) as caught:
        read(text, fields)
    assert str(caught.value) == message
    return caught.value


def test_values_and_the_positions_they_were_written_at():
    settings = read(
        "name: enc\ncount: 3\nratio: 1e-3\nmode: FAST\nenabled: true\n  # c\nscales: [1, 0.5]\n"
    )
    assert settings == {
        "name": Setting("enc", Loc("doc.yaml", 1, 7)),
        "count": Setting(3, Loc("doc.yaml", 2, 8)),
        "ratio": Setting(0.001, Loc("doc.yaml", 3, 8)),  # an exponent is a float, as in YAML 1.2
        "mode": Setting("fast", Loc("doc.yaml", 4, 7)),  # enums are read in lower case
        "enabled": Setting(True, Loc("doc.yaml", 5, 10)),
        "scales": Setting([1, 0.5], Loc("doc.yaml", 7, 9)),
    }
    assert str(settings["count"].loc) == "doc.yaml:2:8"
    assert read("codes: 7\n")["codes"].value == 7  # one value where a list may be given


def test_duplicate_keys_name_both_places():
    fails(
        "name: a\ncount: 1\nname: b\n",
        "doc.yaml:3:1: duplicate key 'name' (first given at doc.yaml:1:1)",
    )
    fails(
        "{count: 1, count: 1}\n",
        "doc.yaml:1:12: duplicate key 'count' (first given at doc.yaml:1:2)",
    )


def test_unknown_keys_suggest_the_closest_and_list_the_allowed():
    error = fails(
        "name: a\n  \nconut: 2\n",
        "doc.yaml:3:1: unknown key 'conut' in the top; did you mean 'count'? "
        "(allowed: name, count, ratio, level, mode, enabled, scales, codes)",
    )
    assert "\n" not in str(error)
    fails(
        "zzz: 1\n",
        "doc.yaml:1:1: unknown key 'zzz' in the top (allowed: name)",
        {"name": FIELDS["name"]},
    )


TYPE_ERRORS = {
    "int-float": ("count: 1.5", "doc.yaml:1:8: count must be an integer, got 1.5"),
    "int-bool": ("count: true", "doc.yaml:1:8: count must be an integer, got True"),
    "int-64-bit": ("count: 9223372036854775808", "doc.yaml:1:8: count must be a 64-bit integer"),
    "int-minimum": ("count: -1", "doc.yaml:1:8: count must be at least 0, got -1"),
    "number-text": ("ratio: half", "doc.yaml:1:8: ratio must be a number, got 'half'"),
    "number-bool": ("ratio: false", "doc.yaml:1:8: ratio must be a number, got False"),
    "number-nan": ("ratio: .nan", "doc.yaml:1:8: ratio must be a finite number, got nan"),
    "number-maximum": ("ratio: 1.5", "doc.yaml:1:8: ratio must be at most 1, got 1.5"),
    "exclusive-minimum": ("level: 50", "doc.yaml:1:8: level must be greater than 50, got 50"),
    "enum": (
        "mode: fats",
        "doc.yaml:1:7: mode must be one of fast, slow, got 'fats'; did you mean 'fast'?",
    ),
    "enum-number": ("mode: 3", "doc.yaml:1:7: mode must be one of fast, slow, got 3"),
    "bool-text": (
        "enabled: yes please",
        "doc.yaml:1:10: enabled must be true or false, got 'yes please'",
    ),
    "str-empty": ("name: ''", "doc.yaml:1:7: name must be non-empty text, got ''"),
    "str-number": ("name: 12", "doc.yaml:1:7: name must be non-empty text, got 12"),
    "list-empty": ("scales: []", "doc.yaml:1:9: scales must not be an empty list"),
    "list-item": ("codes: [1, 2.5]", "doc.yaml:1:12: codes must be an integer, got 2.5"),
    "list-for-a-value": ("count: [1]", "doc.yaml:1:8: expected a single value here"),
    "mapping-for-a-value": ("name: {a: 1}", "doc.yaml:1:7: expected a single value here"),
    "python-tag": (
        "name: !!python/name:os.system x",
        "doc.yaml:1:7: tag 'tag:yaml.org,2002:python/name:os.system' is not allowed in a document",
    ),
}


@pytest.mark.parametrize(("text", "message"), TYPE_ERRORS.values(), ids=TYPE_ERRORS.keys())
def test_each_kind_of_value_refuses_the_others_at_their_position(text, message):
    with pytest.raises(DocError) as caught:
        read(text + "\n")
    assert str(caught.value).startswith(message), str(caught.value)


def test_documents_that_are_not_mappings_of_text_keys():
    fails("- a\n- b\n", "doc.yaml:1:1: the top must be a mapping of keys to values")
    fails("name: a\n3: b\n", "doc.yaml:2:1: keys must be text, got 3")
    fails("name: a\non: b\n", "doc.yaml:2:1: keys must be text, got True")  # YAML 1.1's on
    reader = YamlReader("doc.yaml", "document", DocError)
    root = compose("base: &b {name: a}\n<<: *b\n", "doc.yaml", "document", DocError)
    with pytest.raises(DocError, match=r"^doc\.yaml:2:1: merge keys \(<<\) are not supported"):
        reader.mapping(root, None, "the top")


def test_syntax_errors_empty_and_non_utf8_documents_have_positions():
    cases = {
        "name: [a\ncount: 1\n": r"^doc\.yaml:2:6: YAML syntax error: expected ',' or ']'",
        "": r"^doc\.yaml:1:1: the document is empty; it needs at least 'version: 1'$",
        b"name: a\nmode: \xff\n": r"^doc\.yaml:2:1: the document is not UTF-8 text$",
    }
    for data, message in cases.items():
        with pytest.raises(DocError, match=message):
            compose(data, "doc.yaml", "document", DocError)


UNCLOSED = {
    "flow-sequence-left-open": (
        "version: 1\ndefaults: [\n",
        "doc.yaml:3:1: YAML syntax error: expected the node content, but found '<stream end>' "
        "(the flow sequence begun at 2:11 is not closed)",
    ),
    "flow-sequence-unfinished": (
        "version: 1\ndefaults: [1, 2\n",
        "doc.yaml:3:1: YAML syntax error: expected ',' or ']', but got '<stream end>' "
        "(the flow sequence begun at 2:11 is not closed)",
    ),
    "flow-sequence-before-a-key": (
        "name: [a\ncount: 1\n",
        "doc.yaml:2:6: YAML syntax error: expected ',' or ']', but got ':' "
        "(in the flow sequence begun at 1:7)",
    ),
    "flow-mapping-left-open": (
        "version: 1\ndefaults: {\n",
        "doc.yaml:3:1: YAML syntax error: expected the node content, but found '<stream end>' "
        "(the flow mapping begun at 2:11 is not closed)",
    ),
    "flow-mapping-unfinished": (
        "version: 1\ndefaults: {dtype: qint8\n",
        "doc.yaml:3:1: YAML syntax error: expected ',' or '}', but got '<stream end>' "
        "(the flow mapping begun at 2:11 is not closed)",
    ),
    "flow-mapping-closed-by-a-bracket": (
        "name: {a: 1]\n",
        "doc.yaml:1:12: YAML syntax error: expected ',' or '}', but got ']' "
        "(in the flow mapping begun at 1:7)",
    ),
    "innermost-flow-collection": (
        "name: [1, [2, {a: \n",
        "doc.yaml:2:1: YAML syntax error: expected the node content, but found '<stream end>' "
        "(the flow mapping begun at 1:15 is not closed)",
    ),
    "single-quoted-string": (
        "name: 'enc\ncount: 1\n",
        "doc.yaml:3:1: YAML syntax error: found unexpected end of stream "
        "(the quoted string begun at 1:7 is not closed)",
    ),
    "double-quoted-string": (
        'version: 1\nname: "enc\n',
        "doc.yaml:3:1: YAML syntax error: found unexpected end of stream "
        "(the quoted string begun at 2:7 is not closed)",
    ),
    "quoted-string-before-a-document": (
        "name: 'enc\n---\n",
        "doc.yaml:2:1: YAML syntax error: found unexpected document separator "
        "(the quoted string begun at 1:7 is not closed)",
    ),
    "bad-escape": (
        'name: "a\\qb"\n',
        "doc.yaml:1:10: YAML syntax error: found unknown escape character 'q' "
        "(in the double-quoted string begun at 1:7)",
    ),
    "block-mapping": (
        "name:\n  a: 1\n b: 2\n",
        "doc.yaml:3:2: YAML syntax error: expected <block end>, but found "
        "'<block mapping start>' (in the block mapping begun at 1:1)",
    ),
    "block-mapping-extra-bracket": (
        "scales: [1, 2]]\n",
        "doc.yaml:1:15: YAML syntax error: expected <block end>, but found ']' "
        "(in the block mapping begun at 1:1)",
    ),
    "block-sequence": (
        "- a\nname: b\n",
        "doc.yaml:2:1: YAML syntax error: expected <block end>, but found '?' "
        "(in the block sequence begun at 1:1)",
    ),
    "duplicate-anchor": (
        "name: &a x\nmode: &a y\n",
        "doc.yaml:2:7: YAML syntax error: found duplicate anchor 'a'; first occurrence at 1:7, "
        "second occurrence",
    ),
    "second-document": (
        "name: a\n---\nname: b\n",
        "doc.yaml:2:1: YAML syntax error: expected a single document in the stream at 1:1, but "
        "found another document",
    ),
    # where PyYAML gives no other place, or the same one, the message names one place
    "tab": (
        "name:\n\tmode: fast\n",
        "doc.yaml:2:1: YAML syntax error: found character '\\t' that cannot start any token",
    ),
    "undefined-tag-handle": (
        "name: !x!y a\n",
        "doc.yaml:1:7: YAML syntax error: found undefined tag handle '!x!'",
    ),
}


@pytest.mark.parametrize(("text", "message"), UNCLOSED.values(), ids=UNCLOSED.keys())
def test_syntax_errors_name_where_the_construct_began(text, message):
    with pytest.raises(DocError) as caught:
        compose(text, "doc.yaml", "document", DocError)
    assert str(caught.value) == message


def test_text_quoted_in_syntax_errors_is_cut_to_one_short_line():
    name = "a" * 5000
    with pytest.raises(DocError) as caught:
        compose(f"name: &{name} x\nmode: &{name} y\n", "doc.yaml", "document", DocError)
    context = f"found duplicate anchor {name!r}; first occurrence"
    assert str(caught.value) == (
        "doc.yaml:2:7: YAML syntax error: found duplicate anchor '"
        + "a" * 201
        + f" [... {len(context) - 300} characters cut ...] "
        + "a" * 56
        + "'; first occurrence at 1:7, second occurrence"
    )


def test_read_document_names_the_file(tmp_path):
    path = tmp_path / "doc.yaml"
    with pytest.raises(DocError, match=rf"^{re.escape(str(path))}: no such document file$"):
        read_document(path, "document", DocError)
    path.write_bytes(b"name: x\n" + b" " * MAX_BYTES)
    with pytest.raises(DocError, match=r"doc\.yaml: too large for a document \(limit 4,194,304"):
        read_document(path, "document", DocError)
    path.write_text("name: x\n")
    assert read_document(path, "document", DocError).start_mark.line == 0


def test_version_is_required_and_checked():
    def version(text):
        reader = YamlReader("doc.yaml", "document", DocError)
        root = compose(text, "doc.yaml", "document", DocError)
        reader.version(reader.mapping(root, None, "the top"), root, 1)

    version("version: 1\n")
    with pytest.raises(DocError, match=r"^doc\.yaml:1:1: missing 'version: 1' at the top of the"):
        version("name: x\n")
    for text in ("version: 2\n", "version: '1'\n", "version: 1.0\n", "version: true\n"):
        with pytest.raises(DocError, match=r"^doc\.yaml:1:10: document version .* is not supp"):
            version(text)
