"""Paper-claim reproductions: ``memzoo reproduce CLAIM | --list | --all``.

The registry is ``all_claims()``: the name ``claims`` here is the subpackage that holds one module
per claim (importing any of them binds it on this package).
"""

from pipelines.reproduce.core import (
  SIZES,
  Claim,
  Outcome,
  Settings,
  get,
  load_results,
  reproduce,
  verdict_line,
  write_table,
)
from pipelines.reproduce.core import (
  claims as all_claims,
)

__all__ = [
  "SIZES",
  "Claim",
  "Outcome",
  "Settings",
  "all_claims",
  "get",
  "load_results",
  "reproduce",
  "verdict_line",
  "write_table",
]
