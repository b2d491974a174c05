"""Runs of hex digits: the kernel against the plain-Python reference, and searches that use the run
fields against what yara-python and yara-x match."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import yara
import yara_x

import sspry
from sspry.features.runs import (
    HEX_RUN,
    HEX_WORD,
    HEX_WORD_LENGTHS,
    LONG_WORD,
    RUN_FIELDS,
    RUN_MIN,
    WIDE_HEX_RUN,
    RunCounter,
    reference_fields,
)
from sspry.query.plan import TRUE
from sspry.query.ruleset import plan_rules


def _random_bytes(rng: random.Random) -> bytes:
    """Hex words, wide hex, delimiters, letters and zeros, in runs long and short."""
    out = bytearray()
    size = rng.randrange(0, 400)
    while len(out) < size:
        kind = rng.random()
        if kind < 0.3:
            out += bytes(rng.choice(b"0123456789abcdefABCDEF") for _ in range(rng.randrange(1, 80)))
        elif kind < 0.5:
            for _ in range(rng.randrange(1, 40)):
                out += bytes([rng.choice(b"0123456789ABCDEF"), 0])
        elif kind < 0.6:
            out.append(0)
        else:
            out += bytes(rng.choice(b"ghzZ_.- \xe9\x00\xff1a") for _ in range(rng.randrange(1, 6)))
    return bytes(out[:size])


def _count(data: bytes, cuts: list[int]) -> dict[str, int]:
    """The kernel's fields, fed in chunks that carry up to 7 bytes, as extract.py streams a file."""
    array = np.frombuffer(data, dtype=np.uint8)
    counter = RunCounter()
    start = 0
    for cut in [*cuts, len(data)]:
        carried = min(7, start)
        counter.update(array[start - carried : cut], carried)
        start = cut
    return counter.fields()


def test_kernel_equals_the_reference_whole_and_in_chunks() -> None:
    rng = random.Random(11)
    for _ in range(1500):
        data = _random_bytes(rng)
        want = reference_fields(data)
        assert _count(data, []) == want, data
        cuts = sorted(rng.sample(range(1, len(data)), min(4, len(data) - 1))) if len(data) > 1 else []
        assert _count(data, cuts) == want, (data, cuts)


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b"", (0, 0, 0, 0)),
        (b"0123456", (0, 0, 0, 0)),  # shorter than RUN_MIN: not kept
        (b"01234567", (8, 8, 0, 1 << 8)),  # file start and end are delimiters
        (b"_0123456789_", (10, 10, 0, 1 << 10)),  # '_' is a delimiter for YARA's fullword
        (b"g0123456789", (10, 0, 0, 0)),  # a letter before: not a word
        (b"\xe90123456789abcdef\xe9", (16, 16, 0, 1 << 16)),
        (b"a" * 100, (100, 100, 0, 1 << LONG_WORD)),
        ("0123456789".encode("utf-16-le"), (0, 0, 10, 0)),
        (b"x" + "0123456789".encode("utf-16-le"), (0, 0, 10, 0)),  # the other parity
        (b"01234567.0123456789abcdef", (16, 16, 0, (1 << 8) | (1 << 16))),
    ],
)
def test_fields_of_known_bytes(data: bytes, expect: tuple[int, int, int, int]) -> None:
    fields = dict(zip((HEX_RUN, HEX_WORD, WIDE_HEX_RUN, HEX_WORD_LENGTHS), expect, strict=True))
    assert reference_fields(data) == fields
    assert _count(data, []) == fields
    assert _count(data, [len(data) // 2] if len(data) > 1 else []) == fields


def _word(rng: random.Random, length: int) -> bytes:
    return bytes(rng.choice(b"0123456789abcdefABCDEF") for _ in range(length))


def _files() -> dict[str, bytes]:
    """Files holding hex words of chosen lengths, ascii and wide, between delimiters or not."""
    rng = random.Random(3)
    filler = bytes(rng.randrange(256) for _ in range(3000)).replace(b"\x00", b"\x01")
    filler = bytes(b if not (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122) else 0x2E for b in filler)
    files = {"plain": filler}
    for length in (8, 12, 20, 31, 32, 33, 40, 48, 64, 100, 130, 256, 300):
        files[f"word{length}"] = filler + b" " + _word(rng, length) + b" " + filler
        files[f"glued{length}"] = filler + b"g" + _word(rng, length) + b"z" + filler
        files[f"wide{length}"] = filler + _word(rng, length).decode().encode("utf-16-le") + filler
    files["nocase"] = filler + b" DEADBEEFdeadbeefDEADBEEFdeadbeef " + filler
    return files


RULES = [
    ("big20", "/[0-9a-fA-F]{20}/ fullword ascii"),
    ("big32", "/[0-9a-fA-F]{32}/ fullword wide ascii"),
    ("big48", "/[0-9a-fA-F]{48}/ fullword wide ascii"),
    ("big64", "/[0-9a-fA-F]{64}/ fullword wide ascii"),
    ("big128", "/[0-9a-fA-F]{128}/ fullword wide ascii"),
    ("big256", "/[0-9a-fA-F]{256}/ fullword wide ascii"),
    ("range", "/[0-9a-f]{30,40}/ nocase fullword"),
    ("open", "/[0-9a-f]{100,}/ nocase"),
    ("prefixed", "/g[0-9a-f]{8}([0-9A-F]{4}){2}/ nocase"),
    ("widen", "/[A-F0-9]{40}/ wide"),
    ("hexstr", "{ 30 31 32 33 34 35 36 37 38 [0-4] 39 }"),
    ("short", "/[0-9a-f]{7}/"),
]


def _rule(name: str, string: str) -> str:
    return f"rule {name} {{ strings: $a = {string} condition: $a }}"


def test_searches_keep_every_match_and_narrow(tmp_path: Path) -> None:
    files = _files()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    db = sspry.Database.create(tmp_path / "db", store_path=True)
    try:
        db.index([str(corpus)])
        ids = {hashlib.new(db.policy.id_source, data).digest(): name for name, data in files.items()}
        text = "\n".join(_rule(name, string) for name, string in RULES)
        python = yara.compile(source=text)
        x = yara_x.Scanner(yara_x.compile(text))
        result = db.search(rule=text)
        narrowed = 0
        for rule in result.rules:
            found = {ids[c.source_id] for c in rule.candidates}
            for name, data in files.items():
                matched = {m.rule for m in python.match(data=data)}
                matched_x = {r.identifier for r in x.scan(data).matching_rules}
                if rule.name in matched | matched_x:
                    assert name in found, (rule.name, name)
            narrowed += len(found) < len(files)
        # every rule but the short one (a run below RUN_MIN) and the hex string (its grams) narrows by runs
        plans = {p.name: p for p in plan_rules(text, [n for n, _ in RULES], db.policy)}
        for name, _ in RULES:
            assert (plans[name].upper is TRUE) == (name == "short"), name
        assert narrowed >= len(RULES) - 1
        big32 = {ids[c.source_id] for c in next(r for r in result.rules if r.name == "big32").candidates}
        # the ascii form needs a word of exactly 32 digits; the wide form a run of 32 pairs or more
        wide = {f"wide{n}" for n in (32, 33, 40, 48, 64, 100, 130, 256, 300)}
        assert big32 == {"word32", "nocase"} | wide
    finally:
        db.close()


def test_documents_without_run_fields_stay_candidates(tmp_path: Path) -> None:
    """A forest indexed before the run fields: its documents have none, and the planner keeps them."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a").write_bytes(b"no hex words here at all, xyz")
    db = sspry.Database.create(tmp_path / "db", store_path=True)
    try:
        import sspry.features.extract as extract

        original = extract.RunCounter.fields
        extract.RunCounter.fields = lambda self: {}  # as documents of an older sspry
        try:
            db.index([str(corpus)])
        finally:
            extract.RunCounter.fields = original
        result = db.search(rule=_rule("big", "/[0-9a-fA-F]{32}/ fullword wide ascii"))
        assert len(result.rules[0].candidates) == 1
    finally:
        db.close()


def test_run_fields_are_module_field_names() -> None:
    from sspry import limits

    assert all(limits.FIELD_NAME.fullmatch(name) for name in RUN_FIELDS)
    assert RUN_MIN == 8


def test_rule_check_names_the_runs_a_string_needs() -> None:
    from sspry.policy import Policy
    from sspry.query.rulecheck import check_rules

    text = (
        "rule big { strings: $a = /[0-9a-fA-F]{32}/ fullword wide ascii condition: $a }\n"
        "rule open { strings: $a = /[0-9a-f]{20,}/ fullword condition: $a }\n"
        "rule short { strings: $a = /[0-9a-f]{4}/ condition: $a }\n"
    )
    reports = {r.plan.name: r.to_json() for r in check_rules(Policy(), 16, rule=text)}
    assert reports["big"]["status"] == "searchable"
    assert reports["big"]["strings"][0]["runs"] == [
        "a fullword run of 32 hex digits",
        "a wide run of 32 or more hex digits",
    ]
    assert reports["open"]["strings"][0]["runs"] == ["a fullword run of 20 or more hex digits"]
    assert reports["short"]["status"] == "unsearchable" and reports["short"]["strings"][0]["runs"] == []


@pytest.mark.parametrize(
    ("string", "fixed"),
    [
        ('"abcdef"', 6),
        ('"abc" nocase', 3),
        ("{ FF 75 ?? FF 55 ?? }", 2),
        ("{ 60 E8 00 00 00 00 5D }", 7),
        ("/[0-9a-fA-F]{32}/", 0),
        ("/abc[0-9]+xyzw/", 4),
        ("/(abcd|wxyz)[0-9]/", 4),
        ("/(abcd|x)/", 1),
    ],
)
def test_atom_bytes_are_the_fixed_bytes_every_match_holds(string: str, fixed: int) -> None:
    import yaramod

    from sspry.query.strings import atom_bytes

    parsed = yaramod.Yaramod().parse_string(f"rule a {{ strings: $a = {string} condition: $a }}")
    assert atom_bytes(parsed.rules[0].strings[0]) == fixed


@pytest.mark.parametrize("streamed", [False, True])
def test_extracted_documents_carry_the_run_fields(tmp_path: Path, monkeypatch, streamed: bool) -> None:
    """In memory or streamed in small chunks (runs crossing every chunk boundary), a file's document
    holds the reference's run fields."""
    from sspry.features import extract
    from sspry.policy import Policy

    if streamed:
        monkeypatch.setattr(extract, "IN_MEMORY_BYTES", 1000)
        monkeypatch.setattr(extract, "STREAM_CHUNK", 64)
    rng = random.Random(5)
    data = b"".join(_random_bytes(rng) for _ in range(40))
    path = tmp_path / "f"
    path.write_bytes(data)
    doc = extract.extract_file(str(path), Policy())
    assert {name: doc.fields[name] for name in RUN_FIELDS} == reference_fields(data)
    assert len(data) > 1000 and any(reference_fields(data).values())
