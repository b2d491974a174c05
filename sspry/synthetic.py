"""Reproducible synthetic corpora and rule sets, for the demo, the recall tests and the benchmarks.

A corpus mixes random bytes, English-like text, code-like text and executable-like files (a PE or ELF
header, zero padding, machine-code-like snippets, string tables, packed data). Content is cut from pools
built once per seed, so gigabytes generate quickly and files share content as real ones do. Tokens are
planted into some files in the forms YARA rules look for — ascii, UTF-16LE (wide), mixed case,
single-byte xor — with Zipf popularity: a few tokens in many files, most in few. `rules_for` writes rules
of every kind over the same tokens, so searches have true matches to find and recall checks have ground
truth to compare with (yara-python's).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_WORD_TEXT = (
    "the of and to in is was for on that with as by at from this have are not but which be or had an one "
    "all were their there been has when who will more no if out so what up said about than its into them "
    "can only other new some could time these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three"
)
WORDS = _WORD_TEXT.split()
KINDS = ("random", "text", "code", "executable")


@dataclass
class Corpus:
    directory: Path
    files: list[Path] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    planted: dict[str, list[Path]] = field(default_factory=dict)  # token -> files it was planted in
    bytes: int = 0


def _text(rng: random.Random, size: int) -> bytes:
    words = []
    total = 0
    while total < size:
        word = rng.choice(WORDS)
        words.append(word.capitalize() if rng.random() < 0.05 else word)
        total += len(word) + 1
    return " ".join(words).encode()[:size]


def _code(rng: random.Random, size: int) -> bytes:
    lines = []
    total = 0
    while total < size:
        name = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(3, 10)))
        line = rng.choice(
            [
                f"def {name}(self, value):\n    return value + {rng.randrange(100)}\n",
                f"int {name} = {rng.randrange(1 << 16)};\n",
                f'    log("{name}: %d", {name});\n',
                f"for (i = 0; i < {rng.randrange(64)}; i++) {{ {name}[i] = 0; }}\n",
            ]
        )
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


class _Pools:
    """Content pools cut into files: built once per seed."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.text = np.frombuffer(_text(rng, 4 << 20), dtype=np.uint8)
        self.code = np.frombuffer(_code(rng, 2 << 20), dtype=np.uint8)
        # "functions": short byte patterns repeated with variations, like compiled code
        opcodes = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 7))) for _ in range(600)]
        functions = []
        for _ in range(4000):
            body = b"".join(rng.choice(opcodes) for _ in range(rng.randrange(8, 64)))
            functions.append(b"\x55\x48\x89\xe5" + body + b"\xc3" + b"\xcc" * rng.randrange(0, 12))
        self.machine = np.frombuffer(b"".join(functions), dtype=np.uint8)

    def slices(self, pool: np.ndarray, size: int, rng: np.random.Generator, piece: int) -> np.ndarray:
        out = np.empty(size, dtype=np.uint8)
        at = 0
        while at < size:
            length = min(size - at, int(rng.integers(piece // 2, piece * 2)))
            start = int(rng.integers(0, len(pool) - length))
            out[at : at + length] = pool[start : start + length]
            at += length
        return out


def _executable(pools: _Pools, rng: np.random.Generator, size: int) -> np.ndarray:
    header = (
        b"MZ\x90\x00" + bytes(56) + b"\x80\x00\x00\x00" + bytes(64) + b"PE\x00\x00\x4c\x01"
        if rng.random() < 0.5
        else b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00"
    )
    parts = [np.frombuffer(header, dtype=np.uint8)]
    total = len(header)
    while total < size:
        roll = rng.random()
        length = int(rng.integers(256, 65536))
        if roll < 0.2:
            part = np.zeros(length, dtype=np.uint8)
        elif roll < 0.65:
            part = pools.slices(pools.machine, length, rng, 4096)
        elif roll < 0.85:
            words = pools.slices(pools.text, length, rng, 24)
            part = np.where(words == 0x20, 0, words).astype(np.uint8)  # NUL-separated string table
        else:
            part = rng.integers(0, 256, length, dtype=np.uint8)  # packed or compressed data
        parts.append(part)
        total += length
    return np.concatenate(parts)[:size]


def token_forms(token: str) -> dict[str, bytes]:
    raw = token.encode()
    return {
        "ascii": raw,
        "wide": token.encode("utf-16-le"),
        "mixed": "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(token)).encode(),
        "xor": bytes(b ^ 0x5A for b in raw),
        "base64": base64.b64encode(b"\x00" + raw),
    }


def make_tokens(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choice(string.ascii_letters) for _ in range(rng.randrange(8, 16))) for _ in range(count)
    ]


def file_sizes(
    count: int, rng: np.random.Generator, min_size: int, max_size: int, lognormal: bool
) -> list[int]:
    """Log-uniform sizes, or log-normal (median 8 KiB, sigma 1.6) clipped to [min_size, max_size]."""
    if lognormal:
        sizes = rng.lognormal(math.log(8 << 10), 1.6, count)
    else:
        sizes = np.exp(rng.uniform(math.log(min_size), math.log(max_size), count))
    return [int(s) for s in np.clip(sizes, min_size, max_size)]


def generate(
    directory: Path,
    count: int,
    seed: int = 1,
    tokens: int | list[str] = 8,
    min_size: int = 1 << 10,
    max_size: int = 64 << 10,
    plant_share: float = 0.3,
    lognormal: bool = False,
) -> Corpus:
    """Write `count` files into `directory`. `tokens` is how many random tokens to plant, or the tokens
    themselves; the i-th token is planted with weight 1/(i+1)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pools = _Pools(seed)
    corpus = Corpus(directory)
    corpus.tokens = make_tokens(tokens, seed) if isinstance(tokens, int) else list(tokens)
    weights = np.array([1.0 / (i + 1) for i in range(len(corpus.tokens))])
    weights = weights / weights.sum() if len(weights) else weights
    width = len(str(count - 1))
    for index, size in enumerate(file_sizes(count, rng, min_size, max_size, lognormal)):
        kind = KINDS[index % len(KINDS)]
        if kind == "random":
            data = rng.integers(0, 256, size, dtype=np.uint8)
        elif kind == "text":
            data = pools.slices(pools.text, size, rng, 2048)
        elif kind == "code":
            data = pools.slices(pools.code, size, rng, 2048)
        else:
            data = _executable(pools, rng, size)
        data = bytearray(data.tobytes())
        planted = []
        if corpus.tokens and rng.random() < plant_share:
            for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
                token = corpus.tokens[int(rng.choice(len(corpus.tokens), p=weights))]
                forms = list(token_forms(token).values())
                form = forms[int(rng.integers(0, len(forms)))]
                at = int(rng.integers(0, max(1, len(data) - len(form))))
                data[at : at + len(form)] = form
                planted.append(token)
        path = directory / f"{kind}_{index:0{width}d}.bin"
        path.write_bytes(bytes(data))
        for token in planted:
            corpus.planted.setdefault(token, []).append(path)
        corpus.files.append(path)
        corpus.bytes += len(data)
    return corpus


def rule_for(number: int, token: str) -> str:
    """One rule over `token`, its construct chosen by `number` (every construct in turn)."""
    raw = token.encode()
    hexed = " ".join(f"{b:02X}" for b in raw)
    middle = len(raw) // 2
    left = " ".join(f"{b:02X}" for b in raw[:middle])
    right = " ".join(f"{b:02X}" for b in raw[middle + 1 :])
    regex = (
        "".join(f"\\x{b:02x}" for b in raw[:middle])
        + "[A-Za-z]{1,2}"
        + "".join(f"\\x{b:02x}" for b in raw[middle + 1 :])
    )
    bodies = [
        f'strings: $a = "{token}" condition: $a',
        f'strings: $a = "{token}" wide condition: $a',
        f'strings: $a = "{token}" nocase ascii wide condition: $a',
        f'strings: $a = "{token}" xor(0x50-0x5f) condition: $a',
        f"strings: $a = {{ {hexed} }} condition: $a",
        f"strings: $a = {{ {left} ?? [0-2] {right} }} condition: $a",
        f"strings: $a = /{regex}/ condition: $a",
        f'strings: $a = "{token}" nocase condition: $a and filesize < 16KB',
        f'strings: $a = "{token}" $b = "{token[::-1]}" condition: #a >= 1 and not $b',
        f'strings: $a = "{token}" base64 condition: $a',
        f'strings: $a = "{token}" $b = "{token[:-1]}" wide condition: any of them and uint16(0) == 0x5A4D',
    ]
    kind = number % len(bodies)
    return f"rule r{number}_{kind} {{ {bodies[kind]} }}"


def rules_for(tokens: list[str], seed: int = 1) -> str:
    """YARA rules over the tokens: one per construct per token, so every construct has true matches."""
    rng = random.Random(seed)
    rules = []
    for number, token in enumerate(tokens):
        raw = token.encode()
        hexed = " ".join(f"{b:02X}" for b in raw)
        middle = len(raw) // 2
        gapped = (
            " ".join(f"{b:02X}" for b in raw[:middle])
            + " ?? [0-2] "
            + " ".join(f"{b:02X}" for b in raw[middle + 1 :])
        )
        regex = (
            "".join(f"\\x{b:02x}" for b in raw[:middle])
            + "[A-Za-z]{1,2}"
            + "".join(f"\\x{b:02x}" for b in raw[middle + 1 :])
        )
        xor_lo = rng.randrange(0x50, 0x5A)
        rules += [
            f'rule ascii_{number} {{ strings: $a = "{token}" condition: $a }}',
            f'rule wide_{number} {{ strings: $a = "{token}" wide condition: $a }}',
            f'rule nocase_{number} {{ strings: $a = "{token}" nocase ascii wide condition: $a }}',
            f'rule xor_{number} {{ strings: $a = "{token}" xor({xor_lo}-0x5A) condition: $a }}',
            f"rule hex_{number} {{ strings: $a = {{ {hexed} }} condition: $a }}",
            f"rule hex_gap_{number} {{ strings: $a = {{ {gapped} }} condition: $a }}",
            f"rule regex_{number} {{ strings: $a = /{regex}/ condition: $a }}",
            f'rule small_{number} {{ strings: $a = "{token}" nocase condition: $a and filesize < 16KB }}',
            f'rule count_{number} {{ strings: $a = "{token}" $b = "{token[::-1]}" '
            f"condition: #a >= 1 and not $b }}",
        ]
    if len(tokens) > 1:
        rules.append(
            f'rule two_of {{ strings: $a = "{tokens[0]}" $b = "{tokens[1]}" wide $c = "{tokens[-1]}" nocase '
            "condition: 2 of them }"
        )
        declared = " ".join(f'$t{i} = "{t}"' for i, t in enumerate(tokens))
        rules.append(f"rule any_token {{ strings: {declared} condition: any of them }}")
    return "\n".join(rules) + "\n"


def rule_set(tokens: list[str], size: int) -> str:
    """A bundle of `size` rules, each over its own token (cycling through every construct)."""
    return 'import "pe"\n' + "\n".join(rule_for(i, tokens[i % len(tokens)]) for i in range(size)) + "\n"


SET_SIZES = (1, 10, 100, 1000)
SINGLES = 100


def benchmark_corpus(out: Path, docs: int, seed: int = 1, tokens: int = 1000) -> dict:
    """The corpus and rule sets of scripts/gen_corpus.py (see there), reused when already built."""
    stamp = out / "corpus.json"
    wanted = {"docs": docs, "seed": seed, "tokens": tokens, "version": 1}
    if stamp.exists() and json.loads(stamp.read_text()).get("params") == wanted:
        return json.loads(stamp.read_text())
    corpus = generate(
        out / "files", docs, seed=seed, tokens=tokens, max_size=50 << 20, plant_share=0.4, lognormal=True
    )
    rules = out / "rules"
    (rules / "single").mkdir(parents=True, exist_ok=True)
    for size in SET_SIZES:
        (rules / f"rules_{size}.yar").write_text(rule_set(corpus.tokens, size))
    singles = []
    for number in range(SINGLES):
        path = rules / "single" / f"rule_{number:04d}.yar"
        path.write_text('import "pe"\n' + rule_for(number, corpus.tokens[number]) + "\n")
        singles.append(str(path.resolve()))
    (rules / "rules.list").write_text("\n".join(singles) + "\n")
    summary = {
        "params": wanted,
        "files": len(corpus.files),
        "bytes": corpus.bytes,
        "planted_tokens": len(corpus.planted),
    }
    stamp.write_text(json.dumps(summary, indent=2))
    return summary


def random_document(
    policy, rng: random.Random, blocks: tuple[int, int] | None = None, path: str | None = None
):
    """A Document of random content (no file behind it) that passes `Document.check`: each bloom of a
    size class of the policy (`blocks`, or one of the smallest six), with the estimate that class is sized
    for. For tests and the fault harness, where extracting real files would cost the time."""
    from sspry.bloom import ladder
    from sspry.document import Document, path_key
    from sspry.policy import BLOCK_BITS, bits_per_gram

    sizes = ladder(policy.ladder_steps)
    blooms, estimates = [], []
    for tier in (1, 2):
        nblocks = blocks[tier - 1] if blocks else int(sizes[rng.randrange(6)])
        blooms.append(np.frombuffer(rng.randbytes(nblocks * BLOCK_BITS // 8), dtype=np.uint8))
        estimates.append(math.floor(nblocks * BLOCK_BITS / bits_per_gram(policy.tier_fp(tier))))
    content = rng.randbytes(32)
    return Document(
        source_id=hashlib.new(policy.id_source, content).digest(),
        filesize=rng.randrange(1, 1 << 30),
        tier1=blooms[0],
        tier2=blooms[1],
        tier1_estimate=estimates[0],
        tier2_estimate=estimates[1],
        entropy=rng.random() * 8,
        prefix=content[: rng.randrange(33)],
        path=path,
        path_key=path_key(path) if path else b"",
        mtime_ns=rng.randrange(1 << 60) if path else -1,
    )
