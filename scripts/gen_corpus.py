#!/usr/bin/env python3
"""A reproducible synthetic corpus and matching rule sets, for benchmarks.

  scripts/gen_corpus.py --out DIR --docs N [--seed 1] [--tokens 1000]

writes DIR/files/ (N files, log-normal sizes from 1 KB to 50 MB with a median of 8 KiB; random, text,
code-like and executable-like content; 1,000 tokens planted with Zipf popularity in ascii, wide, mixed
case, xor and base64 forms) and DIR/rules/: rules_1.yar, rules_10.yar, rules_100.yar, rules_1000.yar
(bundles of every construct: text, wide, nocase, xor, hex with wildcards and jumps, regex, base64,
counts, file size and header conditions), single/rule_NNNN.yar (the first 100 rules one per file) and
rules.list (the single rule files, for scripts/server_search_bench.sh). The same seed gives the same
bytes. An existing DIR with the same parameters is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sspry.synthetic import benchmark_corpus


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1000)
    args = parser.parse_args()
    summary = benchmark_corpus(args.out, args.docs, args.seed, args.tokens)
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
