"""CLI errors: expected failures print one line and exit non-zero; bugs keep their traceback."""

from __future__ import annotations

import pytest

from pipelines import cli
from pipelines.errors import NonFiniteLossError, UserError


def test_config_error_is_one_line(tmp_path, capsys):
  path = tmp_path / "c.yaml"
  path.write_text("model:\n  name: transformer\n  d_modle: 8\n")
  assert cli.main(["check", str(path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "d_modle" in err[0] and "d_model" in err[0]


def test_missing_config_is_one_line(tmp_path, capsys):
  assert cli.main(["check", str(tmp_path / "nope.yaml")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "nope.yaml" in err[0]


def test_expected_failures_are_one_line_and_bugs_are_not(monkeypatch, capsys):
  def fail_with(exc):
    def run(args):
      raise exc

    monkeypatch.setattr(cli, "_models", run)
    return cli.main(["models"])

  assert fail_with(NonFiniteLossError("non-finite loss at step 3")) == 3
  assert "training diverged: non-finite loss at step 3" in capsys.readouterr().err
  assert fail_with(UserError("nope")) == 2
  # A ValueError that is not a user error is a bug: it propagates with its traceback.
  with pytest.raises(ValueError, match="internal"):
    fail_with(ValueError("internal"))
