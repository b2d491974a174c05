"""The module part of the metadata sidecar that only YARA-X has: macho, dex, lnk and crx.

yara-python 4.5 has no module for these formats; yara-x does, and `yara_x.Module(name).invoke(data)`
returns what a rule would see. The integer fields listed in `FIELDS` (booleans as 0/1) are kept under
their YARA names, so `macho.cputype == macho.CPU_TYPE_X86_64` or `dex.header.version == 35` is
decided from exactly the value yara-x verification sees. Only these names are planned (the planner asks
`plannable`): every other name of these modules -- strings, arrays, functions, enum-typed fields such as
`lnk.show_command` (invoke gives enums as names, not numbers) -- stays "maybe".

A module is invoked only for files that start with one of its magics (yara-x's own parsers start with
the same checks); every other file gets the module's answer for "neither" (`dex.is_dex = 0`, ...),
tested equal to an invocation. The modules' constants and yaramod's definitions of them are the
planner's (query/moduledefs.py). Documents indexed before these modules existed lack `MARK`, and a
document whose invocation failed (or whose value did not fit) is stored without any of these fields:
the planner treats every field of these modules as unknown where `MARK` is absent, so such documents
stay candidates, never a false "no".
"""

from __future__ import annotations

import re
from functools import cache

X_MODULES = ("macho", "dex", "lnk", "crx")

# yara-x defines lnk.is_lnk for every file (a required field): present in the sidecar exactly where the
# yara-x modules ran on the document
MARK = "lnk.is_lnk"

# thin 32/64-bit and fat 32/64-bit Mach-O, each in both byte orders (yara-x's macho parser checks these)
_MACHO_MAGICS = "feedface cefaedfe feedfacf cffaedfe cafebabe bebafeca cafebabf bfbafeca"
MAGICS: dict[str, tuple[bytes, ...]] = {
    "macho": tuple(bytes.fromhex(m) for m in _MACHO_MAGICS.split()),
    "dex": (b"dex\n",),
    "lnk": (b"L\x00\x00\x00",),  # header size 0x4C (yara-x also checks the CLSID that follows)
    "crx": (b"Cr24",),
}


def _names(spec: str) -> tuple[str, ...]:
    """'a b s.{c d}' -> ('a', 'b', 's.c', 's.d')"""
    names: list[str] = []
    for struct, members, name in re.findall(r"(\w+)\.\{([^}]*)\}|(\w+)", spec):
        names.extend([f"{struct}.{m}" for m in members.split()] if struct else [name])
    return tuple(names)


# The integer (and boolean) fields kept per module: top level and one level into structures, as in
# yara-x's module definitions (lib/src/modules/protos/*.proto) as yara-x 1.23 compiles them (tested).
# Enum-typed fields are left out.
FIELDS: dict[str, tuple[str, ...]] = {
    "macho": _names(
        "magic cputype cpusubtype filetype ncmds sizeofcmds flags reserved number_of_segments entry_point "
        "stack_size fat_magic nfat_arch "
        "symtab.{symoff nsyms stroff strsize} "
        "dysymtab.{ilocalsym nlocalsym iextdefsym nextdefsym iundefsym nundefsym tocoff ntoc modtaboff "
        "nmodtab extrefsymoff nextrefsyms indirectsymoff nindirectsyms extreloff nextrel locreloff nlocrel} "
        "code_signature_data.{dataoff datasize} "
        "dyld_info.{rebase_off rebase_size bind_off bind_size weak_bind_off weak_bind_size lazy_bind_off "
        "lazy_bind_size export_off export_size} "
        "build_version.{platform ntools}"
    ),
    "dex": _names(
        "is_dex header.{magic version checksum file_size header_size endian_tag link_size link_off data_size "
        "data_off container_size header_offset} map_list.{size}"
    ),
    "lnk": _names(
        "is_lnk creation_time access_time write_time file_size file_attributes icon_index "
        "drive_serial_number overlay_size overlay_offset tracker_data.{version}"
    ),
    "crx": _names("is_crx crx_version header_size"),
}
_PLANNABLE = frozenset(f"{module}.{name}" for module, names in FIELDS.items() for name in names)


def plannable(name: str) -> bool:
    """A field of these modules that the sidecar keeps (so a comparison on it can be decided)."""
    return name in _PLANNABLE


class _Unfit(ValueError):
    """A listed field whose value is not an integer that fits: the document is kept without the fields."""


@cache
def _invoker(name: str):
    import yara_x  # here: only indexing and planning need it

    return yara_x.Module(name)


def split_fields(module: str, output: dict) -> dict[str, int]:
    """The listed fields of one module's output, by YARA name (booleans as 0/1)."""
    fields: dict[str, int] = {}
    for name in FIELDS[module]:
        value = output
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue  # undefined for this file, as in a rule
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int) or not -(1 << 63) <= value < (1 << 63):
            raise _Unfit(f"{module}.{name} = {value!r}")
        fields[f"{module}.{name}"] = value
    return fields


@cache
def plain_fields() -> dict[str, int]:
    """What these modules report for a file none of them recognises (dex.is_dex = 0, ..., no macho)."""
    fields: dict[str, int] = {}
    for module in X_MODULES:
        fields.update(split_fields(module, _invoker(module).invoke(b"")))
    return fields


def x_fields(data: bytes | None, head: bytes) -> dict[str, int]:
    """These modules' fields of a file starting with `head`. `data`: its whole content (any buffer, a
    numpy array too), or None when it is too big to hold (then a file one of these modules may parse
    gets no fields: unknown at search)."""
    candidates = [m for m in X_MODULES if head.startswith(MAGICS[m])]
    if not candidates:
        return dict(plain_fields())
    if data is None:
        return {}
    fields = dict(plain_fields())
    try:
        for module in candidates:
            for name in FIELDS[module]:
                fields.pop(f"{module}.{name}", None)
            fields.update(split_fields(module, _invoker(module).invoke(bytes(data))))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # a parser error, a panic in yara-x (pyo3 raises those as BaseException) or
        return {}  # an unfit value: every field of these modules unknown rather than one wrong
    return fields
