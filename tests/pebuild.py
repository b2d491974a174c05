"""Build small but valid PE files (PE32 or PE32+, EXE or DLL, with an import table) for tests, so the
pe module's fields can be exercised without a Windows corpus."""

from __future__ import annotations

import struct

FILE_ALIGN = 0x200
SECTION_ALIGN = 0x1000


def build_pe(
    *,
    bits64: bool = False,
    dll: bool = False,
    timestamp: int = 0x5F000000,
    code: bytes = b"\x55\x8b\xec\xe8\x00\x00\x00\x00\xc3",
    entry_offset: int = 0,
    imports: dict[str, list[str]] | None = None,
    payload: bytes = b"",
    linker: tuple[int, int] = (14, 29),
) -> bytes:
    """A PE whose .text holds `code` (entry point at `entry_offset` in it) then `payload`, and whose
    .idata imports `imports` ({dll: [function, ...]})."""
    imports = imports or {"KERNEL32.dll": ["CreateFileA", "ExitProcess"]}
    pointer = 8 if bits64 else 4
    text = code + payload
    text_raw = _align(len(text), FILE_ALIGN)

    # .idata at RVA 0x1000 * (1 + text pages): descriptors, ILTs, IATs, names
    text_pages = _align(max(len(text), 1), SECTION_ALIGN)
    idata_rva = SECTION_ALIGN + text_pages
    dlls = list(imports.items())
    descriptors_size = 20 * (len(dlls) + 1)
    thunk_counts = [len(functions) + 1 for _, functions in dlls]
    ilt_rva = idata_rva + descriptors_size
    iat_rva = ilt_rva + pointer * sum(thunk_counts)
    names_rva = iat_rva + pointer * sum(thunk_counts)
    names = bytearray()
    hint_rvas: list[list[int]] = []
    dll_name_rvas = []
    for dll_name, functions in dlls:
        rvas = []
        for function in functions:
            rvas.append(names_rva + len(names))
            names += struct.pack("<H", 0) + function.encode() + b"\x00"
            if len(names) % 2:
                names += b"\x00"
        hint_rvas.append(rvas)
        dll_name_rvas.append(names_rva + len(names))
        names += dll_name.encode() + b"\x00"
    idata = bytearray()
    ilt_at, iat_at = ilt_rva, iat_rva
    for index in range(len(dlls)):
        idata += struct.pack("<IIIII", ilt_at, 0, 0, dll_name_rvas[index], iat_at)
        ilt_at += pointer * thunk_counts[index]
        iat_at += pointer * thunk_counts[index]
    idata += bytes(20)
    thunk_format = "<Q" if bits64 else "<I"
    for _ in range(2):  # ILT, then IAT (identical before binding)
        for rvas in hint_rvas:
            for rva in rvas:
                idata += struct.pack(thunk_format, rva)
            idata += struct.pack(thunk_format, 0)
    idata += names
    idata_raw = _align(len(idata), FILE_ALIGN)

    headers_size = FILE_ALIGN
    optional_size = 0xF0 if bits64 else 0xE0
    characteristics = 0x0002 | (0x0020 if bits64 else 0x0100) | (0x2000 if dll else 0)
    machine = 0x8664 if bits64 else 0x14C
    entry_rva = SECTION_ALIGN + entry_offset
    image_size = idata_rva + _align(len(idata), SECTION_ALIGN)

    dos = bytearray(b"MZ" + bytes(58) + struct.pack("<I", 0x80))
    dos += bytes(0x80 - len(dos))
    file_header = struct.pack("<HHIIIHH", machine, 2, timestamp, 0, 0, optional_size, characteristics)
    optional = struct.pack(
        "<HBBIII", 0x20B if bits64 else 0x10B, linker[0], linker[1], text_raw, idata_raw, 0
    )
    optional += struct.pack("<II", entry_rva, SECTION_ALIGN)
    if bits64:
        optional += struct.pack("<Q", 0x140000000)
    else:
        optional += struct.pack("<II", idata_rva, 0x400000)
    optional += struct.pack(
        "<IIHHHHHHIIII", SECTION_ALIGN, FILE_ALIGN, 6, 0, 0, 0, 6, 0, 0, image_size, headers_size, 0
    )
    optional += struct.pack("<HH", 3, 0x8160)  # console subsystem, DYNAMIC_BASE | NX_COMPAT | ...
    stack_heap = "<QQQQ" if bits64 else "<IIII"
    optional += struct.pack(stack_heap, 0x100000, 0x1000, 0x100000, 0x1000)
    optional += struct.pack("<II", 0, 16)
    directories = [(0, 0)] * 16
    directories[1] = (idata_rva, descriptors_size)
    for rva, size in directories:
        optional += struct.pack("<II", rva, size)
    assert len(optional) == optional_size
    sections = struct.pack(
        "<8sIIIIIIHHI", b".text", len(text), SECTION_ALIGN, text_raw, headers_size, 0, 0, 0, 0, 0x60000020
    )
    sections += struct.pack(
        "<8sIIIIIIHHI",
        b".idata",
        len(idata),
        idata_rva,
        idata_raw,
        headers_size + text_raw,
        0,
        0,
        0,
        0,
        0xC0000040,
    )
    header = dos + b"PE\x00\x00" + file_header + optional + sections
    header += bytes(headers_size - len(header))
    return bytes(header) + text + bytes(text_raw - len(text)) + bytes(idata) + bytes(idata_raw - len(idata))


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
