"""The generated reference pages (docs/reference/) are what the code gives now, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
from nexus_sidecar import docs_gen

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(docs_gen.PAGES)


@pytest.mark.parametrize("name", PAGES)
def test_committed_page_is_up_to_date(name: str) -> None:
    rel = docs_gen.REFERENCE / name
    expected = docs_gen.PAGES[name]()
    path = ROOT / rel
    assert path.is_file(), f"{rel} is missing: run `{docs_gen.COMMAND}` (make docs-gen) and commit it"
    assert path.read_text() == expected, (
        f"{rel} is stale (its source changed since it was generated): run `{docs_gen.COMMAND}` "
        "(make docs-gen) and commit the result")


def test_generation_is_deterministic() -> None:
    # The integrator regenerates after every merge: two runs must give the same bytes.
    assert docs_gen.render_all() == docs_gen.render_all()


def test_every_setting_metric_and_command_is_on_its_page() -> None:
    from nexus_sidecar.cli import build_parser
    from nexus_sidecar.server.metrics import Metrics
    from nexus_sidecar.server.settings import ServerSettings
    from nexus_sidecar.settings_cli import env_of, flag_of

    settings = docs_gen.settings_page()
    for name in ServerSettings.model_fields:
        assert f"| `{name}` | `{flag_of(name)}` | `{env_of(name)}` |" in settings, name
    metrics = docs_gen.metrics_page()
    for family in Metrics().registry.collect():  # families drop a counter's _total; the scrape has it
        scraped = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{scraped}` | {family.type} |" in metrics, scraped
    cli = docs_gen.cli_page()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in sub.choices:  # type: ignore[attr-defined]
        assert f"## `nexus-sidecar {command}`" in cli, command
    assert "`--checkpoint-every INT`" in cli and "`--scenario {stationary,needle}`" in cli


def test_check_mode_names_a_stale_page_and_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert docs_gen.main(["--root", str(tmp_path)]) == 0  # writes every page into the temp tree
    assert docs_gen.main(["--check", "--root", str(tmp_path)]) == 0
    page = tmp_path / docs_gen.REFERENCE / "metrics.md"
    page.write_text(page.read_text().replace("nexus_pool_bytes", "nexus_pool_bytez"))
    assert docs_gen.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stale: docs/reference/metrics.md" in err and docs_gen.COMMAND in err
