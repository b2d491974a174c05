"""Shared fixtures: a corpus of generated and real files, indexed once per session into a forest."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sspry import synthetic
from sspry.indexing import index_paths
from sspry.policy import Policy
from sspry.store.forest import Forest
from tests.pebuild import build_pe

SYSTEM_DIRS = ("/usr/bin", "/bin", "/usr/sbin")


def settle(directory: Path) -> Path:
    """Date every file under `directory` (files this test made) an hour back, as files found on a disk
    are: sspry does not trust the stamp of a file modified moments before it read it (document.RACY_NS),
    so a test that re-indexes or verifies such a file at once would see it read or hashed again."""
    past = time.time() - 3600
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (past, past))
    return directory


def system_binaries(count: int) -> list[Path]:
    """Real executables of this machine, a deterministic spread over the sorted list."""
    found = []
    for directory in SYSTEM_DIRS:
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                path = Path(directory) / name
                readable = path.is_file() and not path.is_symlink() and os.access(path, os.R_OK)
                if readable and path.stat().st_size < 4 << 20:
                    found.append(path)
    step = max(1, len(found) // max(count, 1))
    return found[::step][:count]


def pe_samples(tokens: list[str]) -> dict[str, bytes]:
    """Small PE files (see pebuild) carrying planted tokens, for module and entry-point rules."""
    return {
        "pe32.exe": build_pe(payload=tokens[0].encode() * 2),
        "pe64.dll": build_pe(bits64=True, dll=True, code=b"\xe8\x10\x00\x00\x00" + tokens[1].encode()),
        "advapi.exe": build_pe(imports={"ADVAPI32.dll": ["RegOpenKeyA"]}, linker=(2, 30)),
    }


@dataclass
class IndexedCorpus:
    root: Path
    corpus: synthetic.Corpus
    files: list[Path]
    rules: Path


@pytest.fixture(scope="session")
def indexed_corpus(tmp_path_factory) -> IndexedCorpus:
    base = tmp_path_factory.mktemp("corpus")
    corpus = synthetic.generate(base / "generated", 160, seed=42, tokens=6)
    extra = base / "edge"
    extra.mkdir()
    (extra / "empty").write_bytes(b"")
    (extra / "one-byte").write_bytes(b"A")
    (extra / "tiny").write_bytes(corpus.tokens[0].encode())
    for name, data in pe_samples(corpus.tokens).items():
        (extra / name).write_bytes(data)
    binaries = system_binaries(40)
    rules = base / "rules.yar"
    rules.write_text(synthetic.rules_for(corpus.tokens))
    settle(base)
    root = base / "forest"
    Forest.init(root, Policy(store_path=True, shards=4))
    with Forest.open(root, writable=True) as forest:
        summary = index_paths(forest, [str(corpus.directory), str(extra), *map(str, binaries)])
    assert summary.skipped_files == 0
    files = [*corpus.files, *sorted(extra.iterdir()), *binaries]
    return IndexedCorpus(root, corpus, files, rules)
