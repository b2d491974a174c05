"""sspry: a YARA prefilter database."""
