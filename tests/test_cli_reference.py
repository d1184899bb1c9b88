"""README's "## CLI reference" section is the text ``medseg.cli_reference.cli_reference()`` generates from the app, so it
cannot go stale; hidden options (deprecated old flag names) and hidden commands are not in it."""

from __future__ import annotations

import re

import typer

from medseg.cli import app
from medseg.cli_reference import README_SECTION, replace_readme_section
from medseg.cli_reference import cli_reference as render
from tests.helpers import REPO


def cli_reference() -> str:
    """The CLI reference rendered from the app as it is now."""
    return render(typer.main.get_command(app))


REGENERATE = ".venv/bin/python -m medseg.cli cli-reference --readme README.md"


def readme_section(readme: str) -> str:
    """The body of README's CLI reference section (after its heading, up to the next ``## `` heading)."""
    start = readme.index(README_SECTION + "\n") + len(README_SECTION) + 1
    end = readme.find("\n## ", start)
    return readme[start:end if end >= 0 else len(readme)].strip("\n") + "\n"


def test_readme_cli_reference_is_the_generated_one() -> None:
    readme = (REPO / "README.md").read_text()
    assert readme_section(readme) == cli_reference(), (
        f"README's '{README_SECTION}' section differs from the CLI; regenerate it with:\n  {REGENERATE}")


def test_reference_is_deterministic_and_covers_every_visible_command(monkeypatch) -> None:
    text = cli_reference()
    monkeypatch.setenv("COLUMNS", "40")  # no terminal width dependence
    assert cli_reference() == text
    for cmd in ("medseg train", "medseg predict", "medseg evaluate", "medseg demo", "medseg config show",
                "medseg config list", "medseg data phantom", "medseg data import-msd", "medseg data import-images",
                "medseg data validate", "medseg data plan"):
        assert f"### `{cmd}`" in text, cmd
    assert "cli-reference" not in text.split("\n", 1)[1]  # the hidden command itself (named only in the intro)
    assert not re.search(r"--out\b(?!put)", text), "a hidden old flag name is in the reference"
    assert "--help" not in text


def test_replace_readme_section_keeps_the_rest() -> None:
    doc = "# T\n\nintro\n\n## CLI reference\n\nold\n\n## Design\n\nrest\n"
    new = replace_readme_section(doc, "new body\n")
    assert new == "# T\n\nintro\n\n## CLI reference\n\nnew body\n\n## Design\n\nrest\n"
    assert readme_section(new) == "new body\n"
