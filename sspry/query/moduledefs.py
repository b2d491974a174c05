"""yaramod's module definitions, extended with what yara-x's macho, dex, lnk and crx modules have, and
those modules' constant values.

yaramod 4.8 knows YARA 4's macho and dex modules and neither lnk nor crx, so a rule naming
`dex.header.version` or `lnk.is_lnk` does not parse and plans as TRUE. The JSON files in
`yara_x_modules/` add yara-x's fields, arrays, functions and constants (yaramod merges them into its own
definitions of a module); every name in them is one yara-x compiles with that type
(tests/test_xmodules.py). They were written from yara-x's module protos; a name yara-x adds later only
fails to parse (every rule of its file plans as TRUE) until it is added here.

The constants' values are yara-x's own, read once by logging each one through its console module, so
`macho.cputype == macho.CPU_TYPE_X86_64` compares with exactly the value a yara-x rule uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import yaramod

from sspry.features.xmodules import X_MODULES

DEFINITIONS = Path(__file__).with_name("yara_x_modules")


def new_parser() -> yaramod.Yaramod:
    """A yaramod parser that knows yara-x's macho, dex, lnk and crx (building one takes ~25 ms)."""
    return yaramod.Yaramod(yaramod.Features.AllCurrent, str(DEFINITIONS))


def _constant_names(symbol, prefix: str) -> Iterator[str]:
    """Names of the integer-or-string values with an UPPERCASE last part, through structures (enum
    structures such as lnk.ShowCommand hold constants too), not arrays."""
    for name, inner in (symbol.attributes or {}).items():
        kind = type(inner).__name__
        if kind == "StructureSymbol":
            yield from _constant_names(inner, f"{prefix}{name}.")
        elif kind == "ValueSymbol" and name[:1].isupper():
            yield f"{prefix}{name}"


@cache
def constants() -> dict[str, int]:
    """Integer constants of macho, dex, lnk and crx by YARA name (`macho.CPU_TYPE_X86_64`,
    `lnk.ShowCommand.NORMAL`, ...), with yara-x's values. A name yara-x does not define is left out:
    it cannot appear in a rule yara-x verifies."""
    import yara_x

    modules = new_parser().modules
    names = [n for m in X_MODULES if m in modules for n in _constant_names(modules[m].structure, f"{m}.")]
    compiler = yara_x.Compiler()
    for i, name in enumerate(names):
        source = f'import "console"\nimport "{name.split(".")[0]}"\n'
        try:
            compiler.add_source(source + f'rule c{i} {{ condition: console.log("{name}=", {name} + 0) }}\n')
        except yara_x.CompileError:  # not in yara-x, or not an integer (dex.DEX_FILE_MAGIC_035)
            continue
    lines: list[str] = []
    scanner = yara_x.Scanner(compiler.build())
    scanner.console_log(lines.append)
    scanner.scan(b"")
    found: dict[str, int] = {}
    for line in lines:
        name, _, value = line.partition("=")
        try:
            found[name] = int(value)
        except ValueError:
            continue
    return found
