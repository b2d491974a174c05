"""End to end through blooms and the store: every yara-python match is a candidate, and planted-string
rules exclude most of the documents that do not match."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yara

from sspry.query.search import search_rule_file
from sspry.store.forest import Forest
from sspry.verify import verify


def _real_rules() -> Path:
    """The public rule set (not vendored: it is GPL-2.0): $SSPRY_RULES, else `shared/data/rules/
    yara-rules` beside the repository or beside any directory above it (a CI checkout may sit deeper)."""
    if "SSPRY_RULES" in os.environ:
        return Path(os.environ["SSPRY_RULES"])
    relative = Path("shared", "data", "rules", "yara-rules")
    here = Path(__file__).resolve().parent
    found = [parent / relative for parent in here.parents if (parent / relative).is_dir()]
    return found[0] if found else here.parents[1] / relative


REAL_RULES = _real_rules()


def truth(rules: yara.Rules, files) -> dict[str, set[bytes]]:
    found: dict[str, set[bytes]] = {}
    for path in files:
        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).digest()
        for match in rules.match(data=data):
            found.setdefault(match.rule, set()).add(digest)
    return found


def test_generated_rules_recall_and_precision(indexed_corpus) -> None:
    with Forest.open(indexed_corpus.root) as forest:
        result, source = search_rule_file(forest, str(indexed_corpus.rules))
        documents = result.documents
        verify(result, source, forest.policy)
    expected = truth(source.compiled, indexed_corpus.files)
    assert sum(len(v) for v in expected.values()) > 40, "the corpus must give the rules real matches"
    for rule in result.rules:
        candidates = {c.source_id for c in rule.candidates}
        matches = expected.get(rule.name, set())
        assert matches <= candidates, f"{rule.name} missed {len(matches - candidates)} files"
        # verification agrees with yara-python on every candidate
        assert {c.source_id for c in rule.candidates if c.verified} == matches
        assert not any(c.skipped for c in rule.candidates)
        # (nocase prunes like the rest because the forest folds case: see the policy's fold_case)
        if rule.name.startswith(("ascii_", "hex_", "wide_", "regex_", "xor_", "nocase_", "small_")):
            false_positives = len(candidates - matches)
            assert false_positives <= 0.05 * documents, f"{rule.name}: {false_positives} false positives"


@pytest.mark.parametrize(
    "relative",
    [
        "malware/APT_APT1.yar",
        "malware/MALW_Emotet.yar",
        "packers/packer.yar",
        "crypto/crypto_signatures.yar",
        "antidebug_antivm/antidebug_antivm.yar",
        "webshells/WShell_THOR_Webshells.yar",
    ],
)
def test_real_rule_files_recall(indexed_corpus, relative: str) -> None:
    path = REAL_RULES / relative
    if not path.exists():
        pytest.skip(f"{path} not present")
    with Forest.open(indexed_corpus.root) as forest:
        result, source = search_rule_file(forest, str(path))
    expected = truth(source.compiled, indexed_corpus.files)
    for rule in result.rules:
        candidates = {c.source_id for c in rule.candidates}
        assert expected.get(rule.name, set()) <= candidates, rule.name


def test_every_construct_through_the_store(indexed_corpus, tmp_path) -> None:
    """The per-construct rules of test_constructs, searched over the indexed corpus: blooms, segment
    columns and module fields give every file yara-python matches."""
    from tests.test_constructs import CASES, MODULES

    rules = tmp_path / "constructs.yar"
    rules.write_text(MODULES + "".join(f"rule c{i} {{ {body} }}\n" for i, (body, _) in enumerate(CASES)))
    with Forest.open(indexed_corpus.root) as forest:
        result, source = search_rule_file(forest, str(rules))
    expected = truth(source.compiled, indexed_corpus.files)
    assert len(expected) > len(CASES) // 3, "the corpus must give many construct rules real matches"
    for rule in result.rules:
        candidates = {c.source_id for c in rule.candidates}
        assert expected.get(rule.name, set()) <= candidates, (rule.name, CASES[int(rule.name[1:])][0])
