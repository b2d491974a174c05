"""The module part of the metadata sidecar, taken from YARA's own modules (yara-python).

Each file is handed to YARA with the pe, elf and dotnet modules imported and a rule that never matches;
the modules' output comes back through yara-python's modules callback. Every per-file integer field
(top level, and one level into structures: `pe.linker_version.major`) is kept under its YARA name, so
a condition like `pe.number_of_sections > 4` is decided from exactly the value verification would see.
Module constants (UPPERCASE names such as `pe.MACHINE_I386`) are the same for every file and are kept
once, for the planner. Fields a module leaves undefined for a file are simply absent.

The 16 bytes at the entry point (PE or ELF, a file offset as YARA reports it) are kept too, for
`$a at pe.entry_point` and `uint8(pe.entry_point) == 0xE8`.

Formats yara-python has no module for (Mach-O, DEX, LNK, CRX) get their fields from yara-x's modules
(xmodules.py), in the same fields under the same kind of names.
"""

from __future__ import annotations

from functools import cache

import yara

from sspry.document import ENTRY_BYTES
from sspry.features.xmodules import X_MODULES, x_fields

YARA_MODULES = ("pe", "elf", "dotnet")  # from yara-python
MODULES = (*YARA_MODULES, *X_MODULES)  # every module whose fields the sidecar keeps
_SOURCE = "\n".join(f'import "{m}"' for m in YARA_MODULES) + "\nrule sspry_metadata { condition: false }\n"


@cache
def _rules() -> yara.Rules:
    return yara.compile(source=_SOURCE)


def _outputs(data=None, path: str | None = None) -> dict[str, dict]:
    outputs: dict[str, dict] = {}

    def collect(module_data: dict) -> int:
        outputs[module_data["module"]] = module_data
        return yara.CALLBACK_CONTINUE

    if path is not None:
        _rules().match(path, modules_callback=collect, timeout=60)
    else:
        _rules().match(data=data, modules_callback=collect, timeout=60)
    return outputs


def _is_field(name: str, value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and name[:1].islower()


def split_fields(outputs: dict[str, dict]) -> dict[str, int]:
    """Per-file integer fields of module outputs, by YARA name."""
    fields: dict[str, int] = {}
    for module, output in outputs.items():
        for name in output.keys() - _constant_names(module):
            value = output[name]
            if _is_field(name, value):
                fields[f"{module}.{name}"] = value
            elif isinstance(value, dict):
                for inner, inner_value in value.items():
                    if _is_field(inner, inner_value):
                        fields[f"{module}.{name}.{inner}"] = inner_value
    return {k: v for k, v in fields.items() if -(1 << 63) <= v < (1 << 63)}


@cache
def _constant_names(module: str) -> frozenset[str]:
    prefix = module + "."
    return frozenset(name[len(prefix) :] for name in constants() if name.startswith(prefix))


@cache
def constants() -> dict[str, int]:
    """Module constants (`pe.MACHINE_AMD64`, `elf.ET_EXEC`, ...), from an empty scan."""
    found: dict[str, int] = {}
    for module, output in _outputs(data=b"").items():
        for name, value in output.items():
            if name.isupper() and isinstance(value, int):
                found[f"{module}.{name}"] = value
    return found


@cache
def _plain_fields() -> dict[str, int]:
    """What the modules report for a file that is neither PE nor ELF (pe.is_pe = 0, ...)."""
    return split_fields(_outputs(data=b"\x00"))


def module_fields(
    data=None, path: str | None = None, head: bytes | None = None
) -> tuple[dict[str, int], bytes, bool]:
    """(fields, entry-point bytes, scanned) of a file given as bytes-like `data`, or by `path` when it
    is too big to hold in memory (then `head` holds its first bytes). A file YARA cannot scan is
    reported as not scanned: every module predicate on it then stays undecided at search time.

    Only a file starting with "MZ" can be PE (or .NET), only one starting with "\\x7fELF" can be ELF:
    every other file gets the modules' answer for "neither" without a scan (tested equal to a scan). The
    yara-x modules' fields (xmodules.py) are added the same way, and do not depend on `scanned`."""
    head = bytes(data[:8]) if data is not None else (head or b"")
    fields, entry, scanned = _yara_fields(data, path, head)
    fields.update(x_fields(data, head))
    return fields, entry, scanned


def _yara_fields(data, path: str | None, head: bytes) -> tuple[dict[str, int], bytes, bool]:
    """yara-python's part of module_fields: pe, elf and dotnet."""
    if not head.startswith((b"MZ", b"\x7fELF")):
        return dict(_plain_fields()), b"", True
    try:
        fields = split_fields(_outputs(data=data, path=path))
    except yara.Error:
        return {}, b"", False
    entry = b""
    offset = fields.get("pe.entry_point", fields.get("elf.entry_point"))
    if offset is not None and offset >= 0:
        if data is not None:
            entry = bytes(data[offset : offset + ENTRY_BYTES])
        else:
            with open(path, "rb") as handle:  # type: ignore[arg-type]
                handle.seek(offset)
                entry = handle.read(ENTRY_BYTES)
    return fields, entry, True
