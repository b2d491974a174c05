"""What planning a rule gives: its `RulePlan` (the candidate formula, the notes, the string plans), and the
stable codes of the notes the planner leaves where only verification can decide (what `sspry rule-check`
reports)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sspry.query.plan import Node
from sspry.query.strings import StringPlan

CODES = {
    "string-unanchored": "the string forces no gram (too short, or wildcards everywhere)",
    "string-not-understood": "the string's pattern could not be read; it plans as TRUE",
    "negated-string": "a string that must be absent: a bloom can prove absence, never presence",
    "count-may-be-zero": "a string count the condition allows to be zero",
    "vacuous-loop": "`for all`/`none` over a range may hold on an empty range",
    "not-understood": "an expression the planner does not decide",
    "module-array": "module arrays and dictionaries are not in the sidecar",
    "module-function": "a module function the sidecar cannot answer",
    "module-field": "a module value the sidecar does not keep (a string, an enum such as lnk.show_command, "
    "a structure in a structure)",
    "import-names": "pe.imports/pe.exports planned from the names' grams (any case); verification decides",
    "unknown-module": "a module whose values are not stored",
    "string-operator": "string comparisons (contains, matches, ...) and `defined`",
    "read-offset": "an integer read at an offset that is not stored (or not constant)",
    "hash-other-source": "a hash other than the forest's Source ID hash",
    "time-now": "a comparison with time.now that can change between search and verification",
    "non-constant": "a comparison between values only the file knows",
    "plan-error": "the rule could not be planned; it plans as TRUE",
    "not-parsed": "yaramod could not parse the file; every rule plans as TRUE",
}
# code -> what a rule author can do about it (the same table is in docs/usage.md)
HINTS = {
    "string-unanchored": "make the string longer than the largest gram size, or with fewer wildcards",
    "string-not-understood": "report the string: sspry should understand every string YARA compiles",
    "negated-string": "pair the `not $x` with a string that must occur",
    "count-may-be-zero": "add a string that must occur (`$a and #a < 3`)",
    "vacuous-loop": "use `for any`, or add a string that must occur",
    "not-understood": "combine it with a string or a file property (filesize, magic bytes) that must hold",
    "module-array": "add a string or a header check (`uint16(0) == 0x5A4D`) that must hold",
    "module-function": "add a string or a header check (`uint16(0) == 0x5A4D`) that must hold",
    "module-field": "compare an integer field the sidecar keeps (`pe.machine`, `macho.cputype`, ...), or add "
    "a string that must occur",
    "import-names": "none needed: the names' grams narrow the search",
    "unknown-module": "add a string or a file property that must hold",
    "string-operator": "add a string that must occur",
    "read-offset": "read at a constant offset below the forest's prefix bytes (64 by default)",
    "hash-other-source": "compare the forest's Source ID hash (sha256 by default) instead",
    "time-now": "none: only verification can compare with the time of the scan",
    "non-constant": "compare with a constant, or add a string that must occur",
    "plan-error": "report the rule: sspry should plan every rule YARA compiles",
    "not-parsed": "check the file with yaramod, or report it",
}


@dataclass
class Note:
    rule: str
    code: str  # a key of CODES
    text: str
    line: int = 0
    column: int = 0


@dataclass
class RulePlan:
    name: str
    upper: Node  # holds for every document the rule may match: the candidates
    notes: list[Note] = field(default_factory=list)
    strings: list[StringPlan] = field(default_factory=list)
