"""The sidecar's macho, dex, lnk and crx fields (from yara-x's modules) agree with yara-x, and searches on
them return every file yara-x matches -- exactly those files when the rule is only about such fields."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yara_x

import sspry
from sspry.features import xmodules
from sspry.features.metadata import module_fields
from sspry.policy import Policy
from sspry.query import moduledefs
from sspry.query.plan import TRUE
from sspry.query.ruleset import plan_rules
from sspry.query.search import search_snapshot
from tests import xbuild
from tests.pebuild import build_pe

# Mach-O files that ship with the Google Cloud SDK's App Engine and gsutil, when installed: real
# binaries (a thin x86_64 dylib, a fat i386 + x86_64 bundle) beside the built ones
REAL_MACHO = [
    Path("/usr/lib/google-cloud-sdk/platform/google_appengine/google/appengine/tools/java/jetty94/jetty-home/lib/setuid/libsetuid-osx.so"),
    Path("/usr/lib/google-cloud-sdk/platform/gsutil/third_party/crcmod_osx/crcmod/_crcfunext.so"),
]  # fmt: skip


def built_files() -> dict[str, bytes]:
    """Files of every kind yara-x's modules parse, and a few they do not."""
    thin = xbuild.macho()
    arm = xbuild.macho(cputype=xbuild.CPU_TYPE_ARM64, filetype=xbuild.MH_DYLIB, segments=5)
    files = {
        "macho_x86_64": thin,
        "macho_arm64_dylib": arm,
        "macho_i386_be": xbuild.macho(cputype=xbuild.CPU_TYPE_X86, bits64=False, big_endian=True, segments=4),
        "macho_i386_le": xbuild.macho(cputype=xbuild.CPU_TYPE_X86, bits64=False, segments=1),
        "macho_x86_64_be": xbuild.macho(big_endian=True, segments=6),
        "macho_fat": xbuild.fat(thin, arm),
        # a byte-swapped fat header (FAT_CIGAM): yara-x 1.23 reports its one slice at the top level
        "macho_cigam_fat": xbuild.fat(arm, big_endian=False),
        "dex35": xbuild.dex(35),
        "dex39": xbuild.dex(39),
        "lnk": xbuild.lnk(),
        "lnk_hidden": xbuild.lnk(file_size=99, attributes=0x22, icon_index=3),
        "crx3": xbuild.crx(3),
        "crx2": xbuild.crx(2),
        # start with a magic but are not of the type: a Java class (CAFEBABE, like a fat Mach-O), a bad
        # DEX header, a file starting "L\0\0\0" without the CLSID, "Cr24" of an unknown version
        "java_class": bytes.fromhex("cafebabe00000034") + b"\x00" * 64,
        "bad_dex": b"dex\n999\x00" + b"\xff" * 40,
        "not_lnk": b"L\x00\x00\x00" + b"\x11" * 80,
        "crx9": b"Cr24" + b"\x09\x00\x00\x00" + b"\x00" * 30,
        "pe": build_pe(),
        "text": b"nothing to see here\n" * 10,
    }
    for path in REAL_MACHO:
        if path.is_file():
            files[path.name] = path.read_bytes()
    return files


FILES = built_files()


def test_built_files_are_what_yara_x_says() -> None:
    is_type = {
        "macho": lambda out: bool(out.get("magic") or out.get("fat_magic")),
        "dex": lambda out: out.get("is_dex"),
        "lnk": lambda out: out.get("is_lnk"),
        "crx": lambda out: out.get("is_crx"),
    }
    for name, data in FILES.items():
        kinds = {m for m in xmodules.X_MODULES if is_type[m](yara_x.Module(m).invoke(data))}
        expected = {m for m in xmodules.X_MODULES if name.startswith(m) and not name.startswith("crx9")}
        if name.endswith(".so"):
            expected = {"macho"}
        assert kinds == expected, name


def test_every_listed_field_compiles_in_yara_x_and_parses_in_yaramod() -> None:
    parser = moduledefs.new_parser()
    for module, names in xmodules.FIELDS.items():
        for name in names:
            text = f'import "{module}" rule a {{ condition: {module}.{name} == 0 }}'
            yara_x.compile(text)
            parser.parse_string(text)


def _definitions(symbol: dict, path: str):
    """(name, kind, type) of every value, array and function the JSON definitions declare."""
    for item in symbol["attributes"]:
        name = f"{path}.{item['name']}"
        if item["kind"] == "struct":
            yield from _definitions(item, name)
        elif item["kind"] == "array" and "structure" in item:
            yield from _definitions(item["structure"], f"{name}[0]")
        else:
            yield name, item["kind"], item.get("type", item.get("return_type"))


@pytest.mark.parametrize("module", xmodules.X_MODULES)
def test_yaramod_definitions_are_names_yara_x_compiles(module) -> None:
    """Every name the definitions give yaramod is one yara-x compiles, with the type declared."""
    definition = json.loads((moduledefs.DEFINITIONS / f"module_{module}.json").read_text())
    checks = {"i": "{} == 0", "s": '{} == ""', "b": "{} and true"}
    for name, kind, of_type in _definitions(definition, module):
        if kind == "function":
            arguments = ", ".join('"x"' for _ in definition_arguments(definition, name))
            name = f"{name}({arguments})"
        elif kind == "array":
            name = f"{name}[0]"
        condition = checks[of_type].format(name)
        yara_x.compile(f'import "{module}" rule a {{ condition: {condition} }}')
        moduledefs.new_parser().parse_string(f'import "{module}" rule a {{ condition: {condition} }}')


def definition_arguments(definition: dict, name: str) -> list[dict]:
    (function,) = [a for a in definition["attributes"] if a["name"] == name.split(".")[-1]]
    return function["overloads"][0]["arguments"]


def _x_truth(data: bytes, conditions: list[str]) -> list[bool]:
    """Whether each condition (over the four modules) holds for `data`, by yara-x."""
    imports = "".join(f'import "{m}"\n' for m in xmodules.X_MODULES)
    rules = "".join(f"rule r{i} {{ condition: {c} }}\n" for i, c in enumerate(conditions))
    matched = {
        r.identifier for r in yara_x.Scanner(yara_x.compile(imports + rules)).scan(data).matching_rules
    }
    return [f"r{i}" in matched for i in range(len(conditions))]


@pytest.mark.parametrize("name", sorted(FILES))
def test_fields_are_what_yara_x_rules_see(name) -> None:
    """Every listed field: stored exactly where yara-x defines it, with the value a rule compares."""
    data = FILES[name]
    fields, _, _ = module_fields(data=data)
    names = [f"{m}.{n}" for m in xmodules.X_MODULES for n in xmodules.FIELDS[m]]
    defined = _x_truth(data, [f"defined {n}" for n in names])
    assert {n for n, d in zip(names, defined, strict=True) if d} == {n for n in names if n in fields}
    stored = [n for n in names if n in fields]
    assert all(_x_truth(data, [f"{n} == {fields[n]}" for n in stored])), name
    assert fields[xmodules.MARK] in (0, 1)


def test_files_without_a_magic_get_the_answer_of_an_invocation() -> None:
    rng = random.Random(5)
    samples = [FILES["pe"], FILES["text"], b"", b"\x00", b"\x7fELF" + bytes(60)]
    samples += [rng.randbytes(rng.randrange(1, 300)) for _ in range(200)]
    for data in samples:
        if any(data.startswith(m) for magics in xmodules.MAGICS.values() for m in magics):
            continue
        invoked: dict[str, int] = {}
        for module in xmodules.X_MODULES:
            invoked.update(xmodules.split_fields(module, yara_x.Module(module).invoke(data)))
        assert xmodules.x_fields(data, data[:8]) == invoked == xmodules.plain_fields()


def test_constants_are_yara_x_values() -> None:
    constants = moduledefs.constants()
    assert constants["macho.CPU_TYPE_X86_64"] == xbuild.CPU_TYPE_X86_64
    assert constants["macho.MH_DYLIB"] == xbuild.MH_DYLIB
    assert constants["lnk.ShowCommand.NORMAL"] == 1
    modules = "".join(f'import "{m}"\n' for m in xmodules.X_MODULES)
    rules = "".join(f"rule c{i} {{ condition: {n} == {v} }}\n" for i, (n, v) in enumerate(constants.items()))
    assert len(yara_x.Scanner(yara_x.compile(modules + rules)).scan(b"").matching_rules) == len(constants)


# --- searches against yara-x scanning every file ------------------------------------------------------
# (condition, kind): "exact" conditions are only about stored fields, so the candidates must be exactly
# yara-x's matches; "superset" ones are planned but not exactly (strings, functions, enum fields, `not`
# of an undefined value); both with the parser that knows yara-x's modules (moduledefs.new_parser).
# The default yaramod parser knows YARA 4's macho and dex only: NEW names do not parse there.
RULES = [
    ("macho.cputype == macho.CPU_TYPE_X86_64", "exact"),
    ("macho.cputype == macho.CPU_TYPE_ARM64 or macho.cputype == macho.CPU_TYPE_X86", "exact"),
    ("macho.number_of_segments > 3", "exact"),
    ("macho.filetype == macho.MH_DYLIB", "exact"),
    ("macho.flags & macho.MH_PIE", "exact"),
    ("macho.fat_magic == macho.FAT_MAGIC and macho.nfat_arch == 2", "exact"),
    ("macho.magic == macho.MH_CIGAM_64 or macho.magic == 0xfeedface", "exact"),
    ("macho.build_version.platform == 1 or macho.dysymtab.nextdefsym > 10", "exact"),
    ("dex.header.file_size == 128", "exact"),
    ("dex.header.endian_tag == 0x12345678 and filesize < 1KB", "exact"),
    ("dex.header.version == 35", "exact"),
    ("dex.is_dex and dex.header.version >= 39", "exact"),
    ("not dex.is_dex", "exact"),
    ("lnk.is_lnk", "exact"),
    ("lnk.file_attributes & lnk.FILE_ATTRIBUTE_HIDDEN", "exact"),
    ("lnk.is_lnk and not (lnk.file_size == 99)", "exact"),
    ("crx.is_crx and crx.crx_version == 3", "exact"),
    ("crx.header_size > 0 or lnk.icon_index == 3", "exact"),
    ("not (macho.number_of_segments > 3)", "superset"),
    ('macho.cputype == macho.CPU_TYPE_X86_64 and $a\n strings: $a = "__SEG1"', "superset"),
    ("macho.entry_point_for_arch(macho.CPU_TYPE_X86_64) == 0", "superset"),
    ('macho.has_dylib("/usr/lib/libSystem.B.dylib")', "superset"),
    ("macho.min_version.device == macho.MACOSX", "superset"),
    ("lnk.show_command == lnk.ShowCommand.NORMAL", "superset"),
    ('lnk.is_lnk and lnk.name contains "x"', "superset"),
]
NEW = re.compile(r"\b(lnk|crx)\.|dex\.(is_dex|header\.version)|build_version|dysymtab|min_version|has_dylib")


def _rule_text(condition: str) -> str:
    condition, _, strings = condition.partition("\n strings:")
    imports = "".join(f'import "{m}"\n' for m in xmodules.X_MODULES if f"{m}." in condition)
    strings = f"strings: {strings} " if strings else ""
    return f"{imports}rule x {{ {strings}condition: {condition} }}"


def _indexed(tmp_path: Path, files: dict[str, bytes]) -> tuple[sspry.Database, dict[bytes, str]]:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    db = sspry.Database.create(tmp_path / "db", store_path=True)
    db.index([str(corpus)])
    ids = {hashlib.new(db.policy.id_source, data).digest(): name for name, data in files.items()}
    return db, ids


def _candidates(db: sspry.Database, text: str, ids: dict[bytes, str]) -> tuple[set[str], list[str]]:
    """The candidates of rule `x` of `text`, planned as a search plans it, and its plan's note codes."""
    plans = plan_rules(text, ["x"], db.policy)
    result = search_snapshot(db._forest().snapshot(), plans, db.policy, compiled_gather=False)
    return {ids[c.source_id] for c in result.rules[0].candidates}, [n.code for n in plans[0].notes]


def test_searches_return_every_yara_x_match(tmp_path) -> None:
    db, ids = _indexed(tmp_path, FILES)
    try:
        for condition, kind in RULES:
            text = _rule_text(condition)
            scanner = yara_x.Scanner(yara_x.compile(text))
            matches = {name for name, data in FILES.items() if scanner.scan(data).matching_rules}
            found, notes = _candidates(db, text, ids)
            assert matches <= found, (condition, matches - found)
            if kind == "exact":
                assert found == matches and not notes, (condition, found, matches, notes)
            # the whole search: loaded with yara-x as the judge (yara-python has no such module), and
            # verified by yara-x whatever the engine asked for
            for engine in ("yara", "yara-x"):
                result = db.search(rule=text, verify=True, engine=engine)
                (rule,) = result.rules
                assert {ids[c.source_id] for c in rule.candidates} == found, condition
                assert {ids[c.source_id] for c in rule.candidates if c.verified} == matches, condition
    finally:
        db.close()


@pytest.mark.parametrize(
    "text",
    [
        # a structure in a structure: the sidecar keeps one level (as a fact it would be FALSE everywhere)
        'import "dotnet" rule x { condition: dotnet.assembly.version.major == 4 }',
        # enum-typed fields: yara-x's invoke gives their names, so they are not kept
        'import "lnk" rule x { condition: lnk.show_command == lnk.ShowCommand.NORMAL }',
        'import "macho" rule x { condition: macho.min_version.device == macho.MACOSX }',
        'import "lnk" rule x { condition: lnk.drive_type }',
    ],
)
def test_values_the_sidecar_does_not_keep_are_maybe(text) -> None:
    (plan,) = plan_rules(text, ["x"], Policy(), parsed=moduledefs.new_parser().parse_string(text))
    assert plan.upper is TRUE and [n.code for n in plan.notes] == ["module-field"], text


def test_a_module_that_fails_leaves_every_field_unknown(monkeypatch) -> None:
    class Broken:
        def invoke(self, data):
            raise RuntimeError("parser failure")

    plain = xmodules.plain_fields()  # computed once per process, before the modules break
    monkeypatch.setattr(xmodules, "_invoker", lambda name: Broken())
    assert xmodules.x_fields(FILES["macho_x86_64"], FILES["macho_x86_64"][:8]) == {}
    assert xmodules.x_fields(FILES["text"], FILES["text"][:8]) == plain


def test_documents_indexed_without_the_yara_x_modules_stay_candidates(tmp_path, monkeypatch) -> None:
    """A forest indexed before these fields existed (or a file the modules failed on) has no MARK: every
    condition on these modules is unknown there, so it keeps its documents, negated or not."""
    monkeypatch.setattr("sspry.features.metadata.x_fields", lambda data, head: {})
    db, ids = _indexed(tmp_path, FILES)
    try:
        for condition in ("macho.number_of_segments > 3", "not dex.is_dex", "lnk.is_lnk", "not lnk.is_lnk"):
            found, _ = _candidates(db, _rule_text(condition), ids)
            assert found == set(FILES), condition
    finally:
        db.close()


def test_sidecar_bench_runs(tmp_path) -> None:
    """scripts/sidecar_bench.py end to end on a few files: the yara-x modules add fields, never remove."""
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "sidecar_bench.py"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--files",
            "10",
            "--repeat",
            "1",
            "--macho-dir",
            "",
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    report = json.loads(out.read_text())
    for corpus in ("typical", "x"):
        without, with_x = report[corpus]["without"], report[corpus]["with"]
        assert with_x["fields_per_doc"] > without["fields_per_doc"]
        assert with_x["forest_bytes"] > without["forest_bytes"]
    assert report["typical"]["with"]["fields_per_doc"] == report["typical"]["without"]["fields_per_doc"] + 3


def test_rule_files_only_yara_x_compiles_are_searched_everywhere(tmp_path) -> None:
    """A rule file importing macho (which yara-python lacks) loads with yara-x as the judge: a server
    searches it as a Database does, rule-check explains it, scan mode names the fix for --engine yara."""
    from click.testing import CliRunner

    from sspry.cli import main
    from tests.test_server import ServerProcess

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "mach.yar").write_text(
        'import "macho"\nprivate rule helper { condition: macho.number_of_segments > 0 }\n'
        "rule arm { condition: helper and macho.cputype == macho.CPU_TYPE_ARM64 }\n"
    )
    (rules / "plain.yar").write_text("rule small { condition: filesize < 64 }\n")
    db, ids = _indexed(tmp_path, FILES)
    db.close()
    truth = yara_x.compile((rules / "mach.yar").read_text())
    arm = {sid for sid, name in ids.items() if truth.scan(FILES[name]).matching_rules}
    assert arm, "some built file is an ARM64 Mach-O"
    with sspry.Database.open(tmp_path / "db") as local:
        mine = local.search(path=[str(rules)], verify=True)
    server = ServerProcess(tmp_path / "db")
    try:
        with sspry.connect(server.addr) as servers:
            theirs = servers.search(path=[str(rules)], verify=True)
    finally:
        assert server.stop() == 0
    for result in (mine, theirs):
        assert [r.name for r in result.rules] == ["mach.yar:arm", "plain.yar:small"]  # not the private rule
        assert {c.source_id for c in result.rules[0].candidates} == arm  # a field-only rule: exact
        assert {c.source_id for c in result.rules[0].candidates if c.verified} == arm

    checked = CliRunner().invoke(main, ["rule-check", "--rule", str(rules / "mach.yar"), "--json"])
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.output)
    assert [(r["rule"], r["private"], r["status"]) for r in report["rules"]] == [
        ("helper", True, "searchable"),
        ("arm", False, "searchable"),
    ]
    sample = tmp_path / "corpus" / next(iter(FILES))
    refused = CliRunner().invoke(main, ["--rule", str(rules / "mach.yar"), str(sample)])
    assert refused.exit_code == 2 and "needs yara-x: --engine yara-x" in refused.output
    scanned = CliRunner().invoke(main, ["--rule", str(rules / "mach.yar"), "--engine", "yara-x", str(sample)])
    assert scanned.exit_code == 0 and "matched:" in scanned.output
