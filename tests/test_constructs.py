"""One targeted check per construct the planner decides: never a false negative against yara-python
on any sample, and a real pruning effect (the plan excludes a named sample YARA does not match)."""

from __future__ import annotations

import base64
import hashlib
import random
import sys
import time
from pathlib import Path

import pytest
import yara

from sspry.features.metadata import module_fields
from sspry.policy import Policy
from sspry.query.plan import TRUE
from sspry.query.rules import yaramod_parser
from sspry.query.ruleset import plan_rules
from tests.pebuild import build_pe
from tests.planeval import Facts

POLICY = Policy()
NEEDLE = b"needle-one"
CUSTOM = b"!@#$%^&*(){}[].,|ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstu"  # a 64-character alphabet
MODULES = "".join(f'import "{m}"\n' for m in ("pe", "elf", "dotnet", "math", "hash", "time"))


TEXT = b"lorem ipsum dolor sit amet " * 20


def _samples() -> dict[str, bytes]:
    rng = random.Random(5)
    text = TEXT
    samples = {
        "pe32": build_pe(payload=b"xx" + NEEDLE + b"yy" + NEEDLE),
        "pe64dll": build_pe(
            bits64=True, dll=True, code=b"\xe8\x10\x00\x00\x00" + NEEDLE, timestamp=0x7FFFFFF0
        ),
        "pe_advapi": build_pe(imports={"ADVAPI32.dll": ["RegOpenKeyA"]}, linker=(2, 30)),
        "elf": Path(sys.executable).resolve().read_bytes(),
        "needle_at_0": NEEDLE + text,
        "needle_at_3": b"abc" + NEEDLE + text,
        "needle_twice": text + NEEDLE + b" " + NEEDLE,
        "needle_word": text + b" " + NEEDLE + b" " + text,
        "text": text,
        "random": rng.randbytes(3000),
        "high_entropy": bytes(range(256)) * 40,
        "short": b"MZ",
        "zeros": bytes(100),
        "empty": b"",
    }
    for pad in range(3):
        samples[f"b64_{pad}"] = base64.b64encode(b"p" * pad + b"This program cannot run")
    samples["b64wide"] = base64.b64encode(b"xThis program cannot run").decode().encode("utf-16-le")
    samples["b64custom"] = base64.b64encode(b"This program cannot run").translate(
        bytes.maketrans(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
            CUSTOM,
        )
    )
    return samples


SAMPLES = _samples()
DIGEST = hashlib.sha256(SAMPLES["needle_at_3"]).hexdigest()
ELF_ENTRY = module_fields(data=SAMPLES["elf"])[1]  # its entry-point bytes: pe.entry_point is undefined there

SAME_BYTES = "uint8(@a[i]) == uint8(@a[i] + 8)"  # true where the needle is: both bytes are "n"

# rule body -> a sample the plan must exclude (None: only soundness is checked)
CASES: list[tuple[str, str | None]] = [
    # strings at offsets: decided from the stored first bytes
    (f'strings: $a = "{NEEDLE.decode()}" condition: $a at 0', "needle_at_3"),
    (f'strings: $a = "{NEEDLE.decode()}" condition: $a at 3', "needle_at_0"),
    (f'strings: $a = "{NEEDLE.decode()}" condition: $a in (0..5)', "needle_twice"),
    (f'strings: $a = "{NEEDLE.decode()}" fullword condition: $a at 0', "needle_at_3"),
    (f'strings: $a = "{NEEDLE.decode()}" condition: not ($a at 0)', None),
    (f'strings: $a = "{NEEDLE.decode()}" condition: $a at 100', "text"),
    (f'strings: $a = "{NEEDLE.decode()}" nocase condition: $a at 0', "needle_at_3"),
    (f'strings: $a = "{NEEDLE.decode()}{TEXT[:70].decode()}" condition: $a at 0', "needle_at_3"),
    (f'strings: $a = "{NEEDLE.decode()}{TEXT[:70].decode()}" condition: not ($a at 0)', None),
    ("strings: $a = { 6E 65 [1-3] 64 6C ?5 } condition: $a at 0", "needle_at_3"),
    ("strings: $a = /needle.{2,4}e/ condition: $a at 0", "needle_at_3"),
    # entry point: the 16 stored bytes decide the start of a longer string
    ("strings: $a = { E8 ?? 00 00 00 } condition: $a at pe.entry_point", "pe32"),
    (f"strings: $a = {{ E8 ?? 00 00 00 {NEEDLE.hex(' ')} ?? }} condition: $a at pe.entry_point", "pe32"),
    ("strings: $a = { E8 [4] 6E 65 [0-8] 6F } condition: $a at pe.entry_point", "pe32"),
    ("strings: $a = { E8 [4] 6E 65 [0-8] 6F } condition: not ($a at pe.entry_point)", None),
    ("condition: uint8(pe.entry_point) == 0x55", "pe64dll"),
    ("condition: uint16(entrypoint + 1) == 0xEC8B", "pe64dll"),
    ("condition: not (uint8(pe.entry_point) == 0x55)", "pe32"),
    # integer reads
    ("condition: uint16(0) == 0x5A4D", "elf"),
    ("condition: uint32(0) == 0x464C457F", "pe32"),
    ("condition: uint32be(0) == 0x7F454C46", "pe32"),
    ("condition: uint16(0) & 0xFF00 == 0x5A00", "elf"),
    ("condition: int8(1) < 0", "needle_at_0"),
    ("condition: uint32(uint32(0x3C)) == 0x00004550", "elf"),
    ("condition: uint16(0) != 0x5A4D", "pe32"),
    ("condition: uint32(200) == 0x6C64656E", "empty"),
    # file size arithmetic
    ("condition: filesize - 100 > 1000", "short"),
    ("condition: filesize * 2 < 100", "text"),
    ("condition: filesize == 2", "text"),
    ("condition: 2 * filesize + 10 >= 5000", "short"),
    # counts, offsets, lengths, loops
    (f'strings: $a = "{NEEDLE.decode()}" condition: #a == 2', "text"),
    (f'strings: $a = "{NEEDLE.decode()}" condition: #a < 2', None),
    (f'strings: $a = "{NEEDLE.decode()}" condition: @a[1] > 10', "text"),
    (f'strings: $a = "{NEEDLE.decode()}" condition: !a[1] == 10', "text"),
    (f'strings: $a = "{NEEDLE.decode()}" condition: for any i in (1..#a) : (@a[i] > 5)', "text"),
    (f'strings: $a = "{NEEDLE.decode()}" condition: for all i in (1..#a) : (@a[i] > 5)', None),
    # a body only the file decides: the range (1..#a) must still hold a value
    (f'strings: $a = "{NEEDLE.decode()}" condition: for any i in (1..#a) : ({SAME_BYTES})', "text"),
    (f'strings: $a = "{NEEDLE.decode()}" condition: for 1 i in (1..#a) : ({SAME_BYTES})', "text"),
    (f'strings: $a = "{NEEDLE.decode()}" condition: for all i in (1..#a) : (uint8(@a[i]) == 0x6E)', None),
    (f'strings: $a = "{NEEDLE.decode()}" condition: for any i in (0..#a) : (uint8(i) == 0)', None),
    (f'strings: $a = "{NEEDLE.decode()}" condition: $a or for 1 i in (1..3) : (uint8(i) == 0x65)', None),
    # module fields, from YARA's own modules
    ("condition: pe.is_pe", "elf"),
    ("condition: not pe.is_pe", "pe32"),
    ("condition: pe.machine == pe.MACHINE_AMD64", "pe32"),
    ("condition: pe.number_of_sections == 2 and pe.is_dll()", "pe32"),
    ("condition: pe.is_32bit()", "pe64dll"),
    ("condition: pe.is_64bit()", "pe32"),
    ("condition: pe.characteristics & pe.DLL", "pe32"),
    ("condition: pe.linker_version.major == 2", "pe32"),
    ("condition: pe.timestamp > time.now()", "pe32"),
    ("condition: pe.timestamp < time.now()", None),
    ("condition: elf.type == elf.ET_DYN or elf.type == elf.ET_EXEC", "pe32"),
    ("condition: elf.machine == elf.EM_X86_64", "pe32"),
    ("condition: dotnet.is_dotnet", "pe32"),
    ('condition: pe.imports("kernel32.dll", "CreateFileA")', "pe_advapi"),
    ('condition: pe.imports("ADVAPI32.DLL")', "pe32"),
    ('condition: pe.exports("DllMain")', "pe32"),
    ('condition: pe.sections[0].name == ".text"', None),
    ("condition: math.entropy(0, filesize) > 7.9", "text"),
    ("condition: math.entropy(0, filesize) < 5", "random"),
    ("condition: not (math.entropy(0, filesize) < 1)", "zeros"),  # true on an empty file in YARA 4.5
    (f'condition: hash.sha256(0, filesize) == "{DIGEST}"', "needle_at_0"),
    (f'condition: hash.sha256(0, filesize) != "{DIGEST}"', "needle_at_3"),
    ('condition: hash.md5(0, filesize) == "00000000000000000000000000000000"', None),
    # base64 with its three alignments, wide, custom alphabet
    ('strings: $a = "This program" base64 condition: $a', "text"),
    ('strings: $a = "This program" base64wide condition: $a', "b64_0"),
    (f'strings: $a = "This program" base64("{CUSTOM.decode()}") condition: $a', "b64_0"),
    # YARA's undefined values (pe.entry_point of an ELF file, fields of a non-PE file, reads past the
    # end): `not` keeps them undefined, `and` counts them as false, so each of these matches some sample
    (f"condition: not ((uint8(pe.entry_point) == {ELF_ENTRY[0]}) and true)", None),
    (f"strings: $a = {{ {ELF_ENTRY[:4].hex(' ')} }} condition: not (($a at pe.entry_point) and true)", None),
    (f"condition: uint8(elf.entry_point) == {ELF_ENTRY[0]} and not (uint8(pe.entry_point) == 0)", "pe32"),
    ("condition: not ((not (pe.number_of_sections == 2)) and filesize > 0)", None),
    ("condition: not ((not pe.is_dll()) and not pe.is_64bit())", None),
    ("condition: not ((not (uint32(filesize - 2) == 0)) and true)", None),
    ("condition: not ((not (uint16(8) == 0)) or false)", None),
    # strings operators and `defined` stay undecided
    ("condition: pe.sections[0].name matches /text/", None),
    ("condition: defined pe.number_of_sections", None),
]


def _rule_source(body: str) -> str:
    return f"{MODULES}rule t {{ {body} }}\n"


@pytest.mark.parametrize(("body", "excluded"), CASES)
def test_construct(body: str, excluded: str | None) -> None:
    source = _rule_source(body)
    compiled = yara.compile(source=source)
    parsed = yaramod_parser().parse_string(source)
    plan = plan_rules(parsed, ["t"], POLICY, now=time.time())[0].upper
    for name, data in SAMPLES.items():
        facts = Facts(data, POLICY)
        if compiled.match(data=data):
            assert facts.holds(plan), f"false negative on {name}: {plan!r}"
    if excluded is not None:
        assert plan is not TRUE
        assert not compiled.match(data=SAMPLES[excluded])
        assert not Facts(SAMPLES[excluded], POLICY).holds(plan), f"{excluded} not pruned: {plan!r}"


def test_time_now_is_planned_as_at_least_the_search_start() -> None:
    """A timestamp after the search start can still be after time.now at verification: kept; one
    before cannot be after a later time.now: pruned."""
    source = _rule_source("condition: pe.timestamp > time.now()")
    parsed = yaramod_parser().parse_string(source)
    future = Facts(build_pe(timestamp=int(time.time()) + 3600), POLICY)
    past = Facts(build_pe(timestamp=int(time.time()) - 3600), POLICY)
    plan = plan_rules(parsed, ["t"], POLICY, now=time.time())[0].upper
    assert future.holds(plan) and not past.holds(plan)


def test_unscanned_documents_keep_module_predicates_undecided() -> None:
    """If YARA could not scan a file at index time, no module predicate may exclude it."""
    parsed = yaramod_parser().parse_string(
        _rule_source("condition: pe.is_pe and uint8(pe.entry_point) == 0x55")
    )
    plan = plan_rules(parsed, ["t"], POLICY)[0].upper
    facts = Facts(b"not a pe at all", POLICY)
    assert not facts.holds(plan)
    facts.document.scanned[0] = False
    assert facts.holds(plan)


def _random_hex(rng: random.Random, depth: int = 0) -> tuple[str, object]:
    """A random hex-string body and a maker of its matches (rng -> bytes): bytes, wildcards, nibbles,
    jumps and alternations, starting and ending with a whole byte as YARA requires."""
    parts: list[tuple[str, object]] = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.choice("bbbbw?nja" if depth == 0 else "bbw")
        value = rng.randrange(256)
        if kind == "b":
            parts.append((f"{value:02X}", lambda r, v=value: bytes([v])))
        elif kind == "w":
            parts.append(("??", lambda r: bytes([r.randrange(256)])))
        elif kind == "n":
            parts.append((f"{value >> 4:X}?", lambda r, v=value: bytes([(v & 0xF0) | r.randrange(16)])))
        elif kind == "j":
            lo = rng.randint(1, 5)
            hi = rng.choice([lo, lo + rng.randint(1, 4)])
            text = f"[{lo}]" if lo == hi else f"[{lo}-{hi}]"
            parts.append((text, lambda r, lo=lo, hi=hi: r.randbytes(r.randint(lo, hi))))
        elif kind == "a":
            options = [_random_hex(rng, depth + 1) for _ in range(rng.randint(2, 3))]
            text = "(" + " | ".join(body for body, _ in options) + ")"
            parts.append((text, lambda r, o=options: r.choice(o)[1](r)))  # type: ignore[operator]
    first, last = rng.randrange(256), rng.randrange(256)
    parts = [
        (f"{first:02X}", lambda r, v=first: bytes([v])),
        *parts,
        (f"{last:02X}", lambda r, v=last: bytes([v])),
    ]
    return " ".join(t for t, _ in parts), lambda r: b"".join(make(r) for _, make in parts)  # type: ignore[operator]


@pytest.mark.parametrize("where", ["0", "pe.entry_point"])
def test_random_hex_strings_at_a_place_are_decided_by_their_first_bytes(where: str) -> None:
    """`$a at 0` / `$a at pe.entry_point` for random hex strings, most longer than the stored window
    (64 first bytes, 16 at the entry point): never a false negative against yara-python on files that
    hold a match there or elsewhere, and most files without one pruned by the stored bytes alone."""
    rng = random.Random(11)
    pruned = kept_away = 0
    for _ in range(60):
        body, make = _random_hex(rng)
        source = _rule_source(f"strings: $a = {{ {body} }} condition: $a at {where}")
        compiled = yara.compile(source=source)
        plan = plan_rules(yaramod_parser().parse_string(source), ["t"], POLICY)[0].upper
        for placed in (True, False):
            match = make(rng) if placed else rng.randbytes(rng.randint(1, 40))  # type: ignore[operator]
            tail = rng.randbytes(rng.randint(0, 90))
            data = build_pe(code=match + tail) if where != "0" else match + tail
            truth = bool(compiled.match(data=data))
            holds = Facts(data, POLICY).holds(plan)
            assert holds or not truth, f"false negative: {body} on {data[:80].hex()}"
            if not truth:
                kept_away += 1
                pruned += not holds
    assert pruned >= 0.9 * kept_away, (pruned, kept_away)


def test_one_failing_rule_never_fails_the_bundle(monkeypatch) -> None:
    source = (
        _rule_source(f'strings: $a = "{NEEDLE.decode()}" condition: $a')
        + 'rule u { strings: $b = "other-needle" condition: $b }'
    )
    parsed = yaramod_parser().parse_string(source)
    from sspry.query import condition

    real = condition.ConditionPlanner.plan

    def broken(self, expr):
        if self.rule_plan.name == "t":
            raise RuntimeError("boom")
        return real(self, expr)

    monkeypatch.setattr(condition.ConditionPlanner, "plan", broken)
    plans = {p.name: p for p in plan_rules(parsed, ["t", "u"], POLICY)}
    assert plans["t"].upper is TRUE and plans["t"].notes[-1].code == "plan-error"
    assert plans["u"].upper is not TRUE
