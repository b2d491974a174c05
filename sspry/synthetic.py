"""Reproducible synthetic corpora and rule sets, for the demo, the recall tests and the benchmarks.

A corpus mixes random bytes, English-like text, code-like text and executable-like files (headers,
zero padding, string tables), and plants tokens into some files in the forms YARA rules look for:
ascii, UTF-16LE (wide), mixed case, single-byte xor. `rules_for` writes rules of every kind over the
same tokens (text with modifiers, hex with wildcards and jumps, regexes, conditions), so a search has
true matches to find and a recall check has ground truth to compare with (yara-python's).
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

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


def _executable(rng: random.Random, size: int) -> bytes:
    header = (
        b"MZ\x90\x00" + bytes(56) + b"\x80\x00\x00\x00" + bytes(64) + b"PE\x00\x00\x4c\x01"
        if rng.random() < 0.5
        else b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00"
    )
    out = bytearray(header)
    while len(out) < size:
        roll = rng.random()
        if roll < 0.3:
            out += bytes(rng.randrange(16, 512))
        elif roll < 0.6:
            out += rng.randbytes(rng.randrange(64, 2048))
        else:
            out += b"\x00".join(w.encode() for w in rng.sample(WORDS, 8)) + b"\x00"
    return bytes(out[:size])


def token_forms(token: str) -> dict[str, bytes]:
    raw = token.encode()
    return {
        "ascii": raw,
        "wide": token.encode("utf-16-le"),
        "mixed": "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(token)).encode(),
        "xor": bytes(b ^ 0x5A for b in raw),
    }


def generate(
    directory: Path,
    count: int,
    seed: int = 1,
    tokens: int | list[str] = 8,
    min_size: int = 1 << 10,
    max_size: int = 64 << 10,
    plant_share: float = 0.3,
) -> Corpus:
    """Write `count` files into `directory`; sizes are log-uniform in [min_size, max_size]. `tokens` is
    how many random tokens to plant, or the tokens themselves."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(directory)
    if isinstance(tokens, int):
        tokens = [
            "".join(rng.choice(string.ascii_letters) for _ in range(rng.randrange(8, 16)))
            for _ in range(tokens)
        ]
    corpus.tokens = list(tokens)
    makers = {
        "random": rng.randbytes,
        "text": lambda n: _text(rng, n),
        "code": lambda n: _code(rng, n),
        "executable": lambda n: _executable(rng, n),
    }
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        size = int(math.exp(rng.uniform(math.log(min_size), math.log(max_size))))
        data = bytearray(makers[kind](size))
        planted = []
        if corpus.tokens and rng.random() < plant_share:
            for token in rng.sample(corpus.tokens, min(len(corpus.tokens), rng.choice((1, 1, 2)))):
                form = rng.choice(list(token_forms(token).values()))
                at = rng.randrange(0, max(1, len(data) - len(form)))
                data[at : at + len(form)] = form
                planted.append(token)
        path = directory / f"{kind}_{index:05d}.bin"
        path.write_bytes(bytes(data))
        for token in planted:
            corpus.planted.setdefault(token, []).append(path)
        corpus.files.append(path)
        corpus.bytes += len(data)
    return corpus


def rules_for(tokens: list[str], seed: int = 1) -> str:
    """YARA rules over the tokens: one per construct, so every construct has true matches to find."""
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
