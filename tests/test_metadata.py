"""The metadata sidecar agrees with YARA (which it is taken from) and with an independent PE parser."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pefile
import pytest
import yara

from sspry.features.extract import extract_file
from sspry.features.metadata import constants, module_fields
from sspry.policy import Policy
from tests.pebuild import build_pe

PE_VARIANTS = [
    {},
    {"bits64": True},
    {"dll": True, "timestamp": 1234567890},
    {"bits64": True, "dll": True, "entry_offset": 4, "imports": {"WS2_32.dll": ["send", "recv"]}},
]


@pytest.mark.parametrize("variant", PE_VARIANTS)
def test_pe_fields_agree_with_pefile(variant) -> None:
    data = build_pe(**variant)
    fields, entry, scanned = module_fields(data=data)
    assert scanned
    parsed = pefile.PE(data=data)
    assert fields["pe.is_pe"] == 1
    assert fields["pe.machine"] == parsed.FILE_HEADER.Machine
    assert fields["pe.timestamp"] == parsed.FILE_HEADER.TimeDateStamp
    assert fields["pe.number_of_sections"] == parsed.FILE_HEADER.NumberOfSections
    assert fields["pe.characteristics"] == parsed.FILE_HEADER.Characteristics
    assert fields["pe.opthdr_magic"] == parsed.OPTIONAL_HEADER.Magic
    assert fields["pe.subsystem"] == parsed.OPTIONAL_HEADER.Subsystem
    offset = parsed.get_offset_from_rva(parsed.OPTIONAL_HEADER.AddressOfEntryPoint)
    assert fields["pe.entry_point"] == offset
    assert entry == data[offset : offset + 16]
    assert fields["pe.number_of_imports"] == len(parsed.DIRECTORY_ENTRY_IMPORT)


def test_real_pe_files_agree_with_pefile() -> None:
    """Windows PE files from Debian packages (wine, mingw-w64), when SSPRY_PE_DIR points at them."""
    directory = os.environ.get("SSPRY_PE_DIR")
    if not directory:
        pytest.skip("set SSPRY_PE_DIR to a directory of PE files")
    paths = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in (".dll", ".exe"))
    checked = 0
    for path in random.Random(1).sample(paths, min(100, len(paths))):
        data = path.read_bytes()
        fields, _, _ = module_fields(data=data)
        if not fields.get("pe.is_pe"):
            continue
        parsed = pefile.PE(data=data, fast_load=True)
        assert fields["pe.machine"] == parsed.FILE_HEADER.Machine, path
        assert fields["pe.timestamp"] == parsed.FILE_HEADER.TimeDateStamp, path
        assert fields["pe.number_of_sections"] == parsed.FILE_HEADER.NumberOfSections, path
        checked += 1
    assert checked > 10


def test_elf_fields_and_entry_bytes() -> None:
    data = Path(sys.executable).resolve().read_bytes()
    fields, entry, scanned = module_fields(data=data)
    assert scanned and fields["elf.machine"] > 0
    assert fields["elf.type"] in (constants()["elf.ET_EXEC"], constants()["elf.ET_DYN"])
    assert entry == data[fields["elf.entry_point"] : fields["elf.entry_point"] + 16]
    assert "pe.machine" not in fields  # undefined fields are absent, not zero


def test_non_executables_have_no_module_fields_but_are_scanned() -> None:
    fields, entry, scanned = module_fields(data=b"plain text, not an executable")
    assert scanned and entry == b""
    assert fields == {"pe.is_pe": 0, "dotnet.is_dotnet": 0} or all(v == 0 for v in fields.values())


def test_stored_entropy_equals_yaras_to_the_last_bit(tmp_path) -> None:
    # (an empty file's entropy is undefined in YARA: the planner leaves it undecided, see test_constructs)
    for index, data in enumerate(
        [b"a", bytes(range(256)) * 3, random.Random(3).randbytes(5000), b"ab" * 999]
    ):
        path = tmp_path / f"f{index}"
        path.write_bytes(data)
        entropy = extract_file(str(path), Policy()).entropy
        rule = yara.compile(
            source=f'import "math" rule e {{ condition: math.entropy(0, filesize) == {entropy!r} }}'
        )
        assert rule.match(data=data), (data[:20], entropy)


def test_files_neither_pe_nor_elf_get_exactly_what_a_scan_gives() -> None:
    """The shortcut for files that cannot be PE or ELF equals YARA's own module output."""
    from sspry.features import metadata

    rng = random.Random(4)
    samples = [b"", b"M", b"MZ"[:1] + b"Y", b"\x7fEL", b"text file", rng.randbytes(4000), bytes(100)]
    samples += [rng.randbytes(rng.randrange(1, 300)) for _ in range(200)]
    for data in samples:
        if data.startswith((b"MZ", b"\x7fELF")):
            continue
        scanned = metadata.split_fields(metadata._outputs(data=data))
        fields, entry, was_scanned = module_fields(data=data)
        yara_fields = {k: v for k, v in fields.items() if k.split(".")[0] in metadata.YARA_MODULES}
        assert (yara_fields, entry, was_scanned) == (scanned, b"", True), data[:16]
