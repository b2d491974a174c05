"""sspry: a YARA prefilter database. Index files once; for any YARA rule, get back every file that could
match (never missing one), and let YARA verify only those.

    import sspry

    with sspry.Database.create("db", store_path=True) as db:      # or Database.open("db")
        db.index(["/samples"])
        for rule in db.search(path="rules.yar", verify=True).rules:
            print(rule.name, [(c.source_id.hex(), c.paths, c.verified) for c in rule.candidates])

    with sspry.connect("127.0.0.1:17653") as servers:              # the same calls over servers
        servers.search(rule='rule x { strings: $a = "evil" condition: $a }')

See docs/api.md. Names are loaded on first use, so `import sspry` costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sspry.client.cluster import Cluster, connect
    from sspry.client.connection import ClientError
    from sspry.database import Database
    from sspry.deleting import Deletion
    from sspry.indexing import IndexSummary
    from sspry.policy import Policy, PolicyError
    from sspry.progress import Progress, Stage
    from sspry.query.results import Candidate, RuleResult, SearchResult
    from sspry.query.rulecheck import RuleReport
    from sspry.query.rules import RuleError
    from sspry.store.forest import ForestError

_WHERE = {
    "Database": "sspry.database",
    "connect": "sspry.client.cluster",
    "Cluster": "sspry.client.cluster",
    "ClientError": "sspry.client.connection",
    "Deletion": "sspry.deleting",
    "IndexSummary": "sspry.indexing",
    "Policy": "sspry.policy",
    "PolicyError": "sspry.policy",
    "Progress": "sspry.progress",
    "Stage": "sspry.progress",
    "Candidate": "sspry.query.results",
    "RuleResult": "sspry.query.results",
    "SearchResult": "sspry.query.results",
    "RuleReport": "sspry.query.rulecheck",
    "RuleError": "sspry.query.rules",
    "ForestError": "sspry.store.forest",
}
__all__ = [
    "Candidate",
    "ClientError",
    "Cluster",
    "Database",
    "Deletion",
    "ForestError",
    "IndexSummary",
    "Policy",
    "PolicyError",
    "Progress",
    "RuleError",
    "RuleReport",
    "RuleResult",
    "SearchResult",
    "Stage",
    "connect",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'sspry' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
