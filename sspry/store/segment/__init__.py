"""Immutable segments: documents stored column-wise, blooms bit-sliced per size class. The format is
format.py; writer.py builds segments, reader.py reads them."""

from sspry.store.segment.format import SEGMENT_FORMAT, ClassSpan
from sspry.store.segment.reader import ClassArrays, SegmentReader
from sspry.store.segment.writer import FreshPart, Part, SegmentPart, build_segment

__all__ = [
    "SEGMENT_FORMAT",
    "ClassArrays",
    "ClassSpan",
    "FreshPart",
    "Part",
    "SegmentPart",
    "SegmentReader",
    "build_segment",
]
