"""Small well-formed Mach-O, DEX, LNK and CRX files for tests (yara-x's modules parse each as its type:
test_xmodules checks it), built from the formats' published layouts."""

from __future__ import annotations

import hashlib
import struct
import zlib

CPU_TYPE_X86_64 = 0x01000007
CPU_TYPE_ARM64 = 0x0100000C
CPU_TYPE_X86 = 0x00000007
MH_EXECUTE, MH_DYLIB = 2, 6


def macho(
    cputype: int = CPU_TYPE_X86_64,
    filetype: int = MH_EXECUTE,
    segments: int = 2,
    bits64: bool = True,
    big_endian: bool = False,
    flags: int = 0x00200085,
) -> bytes:
    """A thin Mach-O: the mach_header(_64) and `segments` empty LC_SEGMENT(_64) load commands, padded."""
    order = ">" if big_endian else "<"
    magic = 0xFEEDFACF if bits64 else 0xFEEDFACE
    command, size = (0x19, 72) if bits64 else (0x01, 56)
    commands = b""
    for i in range(segments):
        name = f"__SEG{i}".encode().ljust(16, b"\0")
        if bits64:
            commands += struct.pack(
                f"{order}II16sQQQQiiII", command, size, name, 0x1000 * i, 0x1000, 0, 0, 7, 5, 0, 0
            )
        else:
            commands += struct.pack(
                f"{order}II16sIIIIiiII", command, size, name, 0x1000 * i, 0x1000, 0, 0, 7, 5, 0, 0
            )
    header = struct.pack(f"{order}IIIIIII", magic, cputype, 3, filetype, segments, len(commands), flags)
    if bits64:
        header += struct.pack(f"{order}I", 0)
    return (header + commands).ljust(4096, b"\0")


def fat(*slices: bytes, big_endian: bool = True) -> bytes:
    """A fat (universal) Mach-O of thin (little-endian) slices, each aligned to 4096. Fat headers are
    big-endian; written little-endian, the magic reads CAFEBABE byte-swapped (FAT_CIGAM)."""
    order = ">" if big_endian else "<"
    offset = 4096
    table, body = b"", b""
    for data in slices:
        cputype, cpusubtype = struct.unpack("<II", data[4:12])
        table += struct.pack(f"{order}IIIII", cputype, cpusubtype, offset + len(body), len(data), 12)
        body += data.ljust((len(data) + 4095) // 4096 * 4096, b"\0")
    header = struct.pack(f"{order}II", 0xCAFEBABE, len(slices)) + table
    return header.ljust(offset, b"\0") + body


def dex(version: int = 35) -> bytes:
    """A DEX file of its 0x70-byte header (every table empty) and a map list naming only the header,
    with a right checksum and signature."""
    data = bytearray(0x70)
    data[0:8] = b"dex\n" + f"{version:03d}".encode() + b"\0"
    data += struct.pack("<IHHII", 1, 0, 0, 1, 0)  # map_list: one item, TYPE_HEADER_ITEM at 0
    struct.pack_into("<III", data, 32, len(data), 0x70, 0x12345678)
    struct.pack_into("<I", data, 52, 0x70)  # map_off
    data[12:32] = hashlib.sha1(bytes(data[32:])).digest()
    struct.pack_into("<I", data, 8, zlib.adler32(bytes(data[12:])))
    return bytes(data)


LNK_CLSID = bytes.fromhex("0114020000000000c000000000000046")  # 00021401-0000-0000-C000-000000000046


def lnk(file_size: int = 12345, attributes: int = 0x20, show_command: int = 1, icon_index: int = 0) -> bytes:
    """A Shell Link (.lnk) of only its ShellLinkHeader ([MS-SHLLINK] 2.1): no optional structures."""
    times = (132_000_000_000_000_000, 132_000_000_100_000_000, 132_000_000_200_000_000)
    return struct.pack(
        "<I16sII3QIiIHHII",
        0x4C,
        LNK_CLSID,
        0,
        attributes,
        *times,
        file_size,
        icon_index,
        show_command,
        0,
        0,
        0,
        0,
    )


def crx(version: int = 3) -> bytes:
    """A CRX package: "Cr24", the version, its header and an empty zip archive. CRX3's header is a
    CrxFileHeader protobuf holding only signed_header_data (field 10000), a SignedData with a 16-byte
    crx_id; CRX2's is an empty public key and signature."""
    empty_zip = b"PK\x05\x06" + b"\0" * 18
    if version == 2:
        return b"Cr24" + struct.pack("<III", 2, 0, 0) + empty_zip
    signed_data = b"\x0a\x10" + bytes(range(16))
    header = b"\x82\xf1\x04" + bytes([len(signed_data)]) + signed_data  # field 10000, length-delimited
    return b"Cr24" + struct.pack("<II", 3, len(header)) + header + empty_zip
