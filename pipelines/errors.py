"""Expected failures of the jobs. The CLI prints any :class:`UserError` as one line and exits
non-zero; every other exception is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
  """A failure the user can act on: bad input, a refused model, a missing run, a diverged run."""

  exit_code = 2
  label = "error"


class InputError(UserError, ValueError):
  """A bad argument, file or value."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or run directory the command needs does not exist."""


class ConfigError(InputError):
  """A config that cannot be used; the message names the key and the file."""

  label = "config error"


class CorruptFileError(InputError):
  """A checkpoint or weights file that is truncated, corrupted or fails its checksum."""


class UnsupportedModelError(InputError):
  """A model (e.g. a Hugging Face config) that memzoo cannot reproduce exactly; refused."""


class NonFiniteLossError(UserError, FloatingPointError):
  """A step's loss, gradient, update or new parameters became NaN/inf; the run stops without
  checkpointing it."""

  exit_code = 3
  label = "training diverged"
