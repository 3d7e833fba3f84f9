"""Paper-claim reproductions: ``memzoo reproduce CLAIM | --list | --all``."""

from pipelines.reproduce.core import (
  SIZES,
  Claim,
  Outcome,
  Settings,
  claims,
  get,
  load_results,
  reproduce,
  verdict_line,
  write_table,
)

__all__ = [
  "SIZES",
  "Claim",
  "Outcome",
  "Settings",
  "claims",
  "get",
  "load_results",
  "reproduce",
  "verdict_line",
  "write_table",
]
