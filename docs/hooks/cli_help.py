"""MkDocs hook: replaces ``<!-- parallax-help -->`` / ``<!-- parallax-help COMMAND -->`` in a
page with the ``--help`` text of ``parallax`` / ``parallax COMMAND``, so docs/cli.md is
rendered from the argparse definitions and never drifts from them."""

from __future__ import annotations

import os
import re
import sys

_MARK = re.compile(r"<!-- parallax-help ?([a-z]*) -->")


def _help(command: str, config) -> str:
    root = os.path.dirname(config.config_file_path)
    sys.path.insert(0, os.path.join(root, "src"))      # this checkout's parallax
    from parallax.cli import build_parser
    top = build_parser()
    parser = top
    if command:
        sub = next(a for a in top._actions if a.dest == "command")
        parser = sub.choices[command]
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"                       # argparse wraps to the terminal
    try:
        return parser.format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def on_page_markdown(markdown: str, page, config, files) -> str:
    return _MARK.sub(lambda m: "```text\n" + _help(m.group(1), config) + "```", markdown)
