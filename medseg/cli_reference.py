"""The CLI reference in the README, generated from the app's click objects (``medseg cli-reference``)."""

from __future__ import annotations

import inspect
from typing import Any

README_SECTION = "## CLI reference"
REFERENCE_INTRO = (
    "Every command and its options, generated from the app by `medseg cli-reference` "
    "(`tests/test_cli_reference.py` checks that this section matches it; "
    "`medseg cli-reference --readme README.md` rewrites it)."
)


def cli_reference(root: Any) -> str:
    """Markdown reference of every command and subcommand of ``root`` (the click command behind the typer app:
    ``typer.main.get_command(app)``): usage, help text, arguments and options.

    Read from the click objects behind the typer app; hidden commands and hidden options (deprecated old
    spellings) are left out, and nothing is wrapped, so the text depends on neither the terminal nor its width.
    """
    blocks = [REFERENCE_INTRO]

    def walk(cmd: Any, ctx: Any) -> None:  # click (or typer's vendored click) Command and Context
        params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False) and p.name != "help"]
        records = [
            (kind, rec)
            for kind in ("argument", "option")
            for p in params
            if p.param_type_name == kind and (rec := p.get_help_record(ctx)) is not None
        ]
        width = max((len(r[0]) for _, r in records), default=0)
        lines = [" ".join(["Usage:", ctx.command_path, *cmd.collect_usage_pieces(ctx)]), ""]  # get_usage wraps
        if cmd.help:
            lines += [inspect.cleandoc(cmd.help), ""]
        for kind, title in (("argument", "Arguments:"), ("option", "Options:")):
            rows = [f"  {name.ljust(width)}  {text}".rstrip() for k, (name, text) in records if k == kind]
            if rows:
                lines += [title, *rows]
        blocks.append(f"### `{ctx.command_path}`\n\n```text\n" + "\n".join(lines).rstrip() + "\n```")
        if hasattr(cmd, "list_commands"):  # a group
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, sub.make_context(name, [], parent=ctx, resilient_parsing=True))

    walk(root, root.make_context("medseg", [], resilient_parsing=True))
    return "\n\n".join(blocks) + "\n"


def replace_readme_section(readme: str, body: str) -> str:
    """``readme`` with the text between ``## CLI reference`` and the next ``## `` heading replaced by ``body``."""
    start = readme.index(README_SECTION + "\n") + len(README_SECTION) + 1
    end = readme.find("\n## ", start)
    return readme[:start] + "\n" + body + readme[end if end >= 0 else len(readme) :]
