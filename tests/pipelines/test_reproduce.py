"""``memzoo reproduce``: the claim registry, the files each run writes, the table, the CLI."""

from __future__ import annotations

import json

import pytest

from pipelines import cli
from pipelines import reproduce as rp
from pipelines.reproduce import core


def _toy(holds: bool):
  def run(settings):
    value = settings.pick(tiny=1.0, small=2.0, large=3.0) + settings.seed
    return rp.Outcome(
      measured=f"value {value:g}",
      holds=holds,
      data={"value": value},
      plot=lambda fig: fig.add_subplot().plot([0, 1], [0, value]),
      note="toy",
    )

  return rp.Claim("toy_" + str(holds).lower(), "Toy (2026)", "the value is positive", run, 0.0)


@pytest.fixture
def toys(monkeypatch):
  found = {c.name: c for c in (_toy(True), _toy(False))}
  monkeypatch.setattr(core, "claims", lambda: found)
  monkeypatch.setattr(rp, "all_claims", lambda: found)
  return found


def test_reproduce_writes_result_png_and_table(toys, tmp_path):
  rec = rp.reproduce("toy_true", rp.Settings(size="tiny", seed=2, out_dir=tmp_path))
  saved = json.loads((tmp_path / "toy_true" / "result.json").read_text())
  assert saved["data"] == {"value": 3.0} and saved == json.loads(json.dumps(rec))
  assert (tmp_path / "toy_true" / "toy_true.png").stat().st_size > 1000
  rp.reproduce("toy_false", rp.Settings(size="small", out_dir=tmp_path))
  table = rp.write_table(tmp_path, tmp_path / "docs" / "REPRODUCTIONS.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| `toy")]
  assert len(rows) == 2
  assert "**holds**" in rows[0] and "**does not hold**" in rows[1]
  assert "](../toy_true/toy_true.png)" in table  # image links relative to the table's folder


def test_cli_list_unknown_claim_and_all(toys, tmp_path, capsys):
  assert cli.main(["reproduce", "--list"]) == 0
  assert "toy_true" in capsys.readouterr().out
  # An unknown name is refused before any claim runs: nothing is written.
  assert cli.main(["reproduce", "toy_true", "nope", "--out", str(tmp_path)]) == 2
  assert "unknown claim 'nope'" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())
  assert cli.main(["reproduce", "--all", "--size", "tiny", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "toy_false: the value is positive | measured: value 1 | does not hold" in out
  assert (tmp_path / "REPRODUCTIONS.md").exists()


def test_every_shipped_claim_is_registered_with_its_paper():
  for name, claim in core.claims().items():
    assert claim.name == name and claim.paper and claim.statement and claim.minutes > 0


def test_cli_lists_the_real_claims_after_a_claim_module_is_imported(capsys):
  # Importing a claim module binds the subpackage ``pipelines.reproduce.claims`` on the package;
  # the registry must stay callable, as when one process runs several commands.
  import pipelines.reproduce.claims.streaming_llm  # noqa: F401

  for _ in range(2):
    assert cli.main(["reproduce", "--list"]) == 0
    assert "streaming_llm" in capsys.readouterr().out
