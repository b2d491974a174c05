#!/usr/bin/env python3
"""What a gram index could give a rule file at best: the candidates of a *perfect* gram index (the exact
set of each document's grams, no bloom false positive) with the forest's gram sizes and sspry's plans
(at most --max-anchors-per-pattern grams per string and tier: 16), against the forest's own candidates
and the files that truly match.

  scripts/gram_bound.py --root FOREST --rules FILE [--processes 2] [--json OUT]

The forest (initialised with --store-path) is searched with --verify in this process. Each rule's plan
is then evaluated over each of its candidate documents with the document's true grams, read from its
file: a gram leaf holds exactly when the file contains those bytes (Tier 1 also lowercased, when the
forest folds case), And/Or/AtLeast/Not as usual, and every other leaf (file size, module fields, bytes
at an offset, ...) as unknown, in three-valued logic. A document whose plan is true is a candidate of
the perfect index whatever the unknown leaves hold; one whose plan is unknown may be. So the perfect
index's candidates lie between the two counts printed (`exact grams, at least` and `at most`). Plans
never negate a gram, so a bloom (a superset of the true grams) can only add candidates: the forest's
candidates hold every candidate of the perfect index, and evaluating only them loses none.

Each list of files is then scanned with the whole rule file by yara-python (fast mode, `--processes`
processes): search + verify cannot take less than the search plus YARA over the perfect index's
candidates, whatever the blooms' sizes. Where that is close to scanning every file, a rule set is
beyond what a gram prefilter can do on that corpus (Yara-Rules' capabilities/ and antidebug_antivm/
over large binaries: the binaries hold every gram of the rules' short strings). Each document's grams
are read from its first recorded path.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yara

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ruleset_bench import brute_force

import sspry
from sspry.query.plan import And, AtLeast, Const, Gram, Node, Not, Or, leaves
from sspry.query.ruleset import plan_rules

CHUNK = 1 << 24  # bytes of a file read at a time: the window arrays stay at 8 bytes per byte of it
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[ord("A") : ord("Z") + 1] += 32  # ASCII capitals lowercased, as a folding forest indexes Tier 1
_LOW_BITS = np.uint64((1 << 24) - 1)


@dataclass
class Tier:
    """The grams of one tier that the plans read, and how to find them in a file's bytes."""

    size: int
    folds: bool
    by_value: dict[int, bytes]  # a gram's bytes as a big-endian integer -> its Gram (tier byte + bytes)
    values: np.ndarray  # the integers, sorted
    hints: np.ndarray  # 2**24 flags: some wanted gram ends with these 24 bits (a cheap first test)

    @classmethod
    def of(cls, tier: int, size: int, folds: bool, grams: Iterable[bytes]) -> Tier:
        by_value = {int.from_bytes(g[1:], "big"): g for g in grams if g[0] == tier}
        values = np.array(sorted(by_value), dtype=np.uint64)
        hints = np.zeros(1 << 24, dtype=bool)
        hints[(values & _LOW_BITS).astype(np.int64)] = True
        return cls(size, folds, by_value, values, hints)

    def found_in(self, data: np.ndarray) -> set[bytes]:
        """The wanted grams that occur in `data`."""
        if len(data) < self.size or not len(self.values):
            return set()
        found: set[bytes] = set()
        for view in (data, _LOWER[data]) if self.folds else (data,):
            count = len(view) - self.size + 1
            windows = np.zeros(count, dtype=np.uint64)
            for i in range(self.size):
                windows = (windows << np.uint64(8)) | view[i : i + count].astype(np.uint64)
            likely = windows[self.hints[(windows & _LOW_BITS).astype(np.int64)]]
            found.update(self.by_value[v] for v in np.intersect1d(likely, self.values).tolist())
        return found


def grams_in(path: str, tiers: list[Tier], chunk: int = CHUNK) -> set[bytes]:
    """The plans' grams that the file holds, read `chunk` bytes at a time (windows across two chunks
    included)."""
    keep = max(t.size for t in tiers) - 1
    found: set[bytes] = set()
    with open(path, "rb") as handle:
        carried = b""
        while block := handle.read(chunk):
            data = np.frombuffer(carried + block, dtype=np.uint8)
            for tier in tiers:
                found |= tier.found_in(data)
            carried = (carried + block)[-keep:] if keep else b""
    return found


def holds(node: Node, grams: set[bytes], memo: dict[int, bool | None]) -> bool | None:
    """The plan over a document with these grams: True, False, or None (it depends on a leaf other
    than a gram)."""
    if isinstance(node, Gram):
        return bytes(node) in grams
    if id(node) in memo:
        return memo[id(node)]
    value: bool | None
    if isinstance(node, Const):
        value = node.value
    elif isinstance(node, Not):
        inner = holds(node.child, grams, memo)
        value = None if inner is None else not inner
    elif isinstance(node, And | Or | AtLeast):
        values = [holds(child, grams, memo) for child in node.children]
        need = len(values) if isinstance(node, And) else 1 if isinstance(node, Or) else node.k
        sure, open_ = values.count(True), values.count(None)
        value = True if sure >= need else None if sure + open_ >= need else False
    else:
        value = None
    memo[id(node)] = value
    return value


def bound(root: Path, rules: Path, processes: int = 2) -> dict:
    text = rules.read_text()
    targets = [r.identifier for r in yara.compile(source=text) if not r.is_private]
    with sspry.Database.open(root) as db:
        policy = db.policy
        result = db.search(path=str(rules), verify=True)
    plans = {plan.name: plan.upper for plan in plan_rules(text, targets, policy)}
    wanted = {bytes(gram) for upper in plans.values() for gram in leaves(upper, Gram)}
    tiers = [
        Tier.of(tier, size, policy.fold_case and tier == 1, wanted)
        for tier, size in enumerate(policy.gram_sizes, start=1)
    ]
    path_of: dict[bytes, str] = {}
    sure: set[bytes] = set()
    maybe: set[bytes] = set()
    matching: set[bytes] = set()
    present: dict[bytes, set[bytes]] = {}
    for rule in result.rules:
        for candidate in rule.candidates:
            sid = candidate.source_id
            if candidate.skipped:
                continue  # changed or gone since it was indexed: its grams are not the indexed ones
            path_of.setdefault(sid, candidate.paths[0])
            if sid not in present:
                present[sid] = grams_in(path_of[sid], tiers)
            value = holds(plans[rule.name], present[sid], {})
            (sure if value else maybe if value is None else set()).add(sid)
            if candidate.verified:
                matching.add(sid)
    report: dict = {
        "rules": len(targets),
        "documents": result.documents,
        "gram_sizes": list(policy.gram_sizes),
        "timings_ms": result.timings_ms,
    }
    for name, documents in (
        ("candidates", set(path_of)),
        ("exact_grams_at_least", sure),
        ("exact_grams_at_most", sure | maybe),
        ("matching", matching),
    ):
        files = sorted(path_of[d] for d in documents)
        seconds = brute_force(rules, files, processes, fast=True)[0] if files else 0.0
        size = sum(Path(f).stat().st_size for f in files)
        report[name] = {"files": len(files), "bytes": size, "yara_s": round(seconds, 3)}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, type=Path, help="a forest initialised with --store-path")
    parser.add_argument("--rules", required=True, type=Path, help="one YARA rule file")
    parser.add_argument("--processes", type=int, default=2, help="yara-python processes")
    parser.add_argument("--json", dest="json_out", type=Path)
    args = parser.parse_args()
    report = bound(args.root, args.rules, args.processes)
    print(f"{args.rules.name}: {report['rules']} rules over {report['documents']} documents")
    print(f"{'':<24}{'files':>8}{'GB':>9}{'yara -f s':>11}")
    for name in ("candidates", "exact_grams_at_least", "exact_grams_at_most", "matching"):
        row = report[name]
        label = name.replace("_", " ")
        print(f"{label:<24}{row['files']:>8}{row['bytes'] / 1e9:>9.3f}{row['yara_s']:>11.2f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
