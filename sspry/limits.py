"""The limits every document row obeys, checked when it is inserted (`Document.check`), so that nothing a
forest accepts can fail to publish. A row over a limit is refused with a PolicyError naming the limit.

Per segment, nothing can overflow: documents are indexed with 32 bits and a segment holds at most
`tree_docs` (≤ MAX_TREE_DOCS) of them; module field names are indexed with 32 bits, so any number of
distinct names fits. Per row:
"""

from __future__ import annotations

import re

MAX_FIELDS_PER_ROW = 512  # module fields of one document (YARA's pe/elf/dotnet give about 100)
MAX_FIELD_NAME_BYTES = 128
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # YARA identifiers, dotted
MAX_PATH_BYTES = 4096  # a stored path, UTF-8 (Linux's PATH_MAX)
MAX_ROW_BYTES = 1 << 30  # a whole row: both blooms and everything else (a frame of the ingest log)
ENTRY_BYTES = 16  # bytes kept at the entry point
# Bloom sizes: each tier's bloom is the size class the policy gives its estimate (sizing.bloom_blocks),
# so its size follows from the estimate, and the row limit bounds both.

# Per policy (checked by Policy itself):
MAX_TREE_DOCS = 1 << 31  # documents per Tree, so per segment: indexed with uint32 inside a segment
MAX_PREFIX_BYTES = 4096  # first bytes kept per document (prefix_len is uint16)
