"""``peft methods``: the fine-tuning methods installed plugins provide, and the plugins that were refused.

Reads only the plugin registry, so it runs without importing torch.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "methods", help="list the installed fine-tuning methods",
        description="List the fine-tuning methods of the installed plugins (name, peft_type, package, version) "
        "and the plugins that were refused, with the reason.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list, for scripts")
    parser.set_defaults(run=run)
    return parser


def rows() -> list[dict[str, Any]]:
    """One dict per method (then per refused plugin), as ``--json`` prints them."""
    from peft_core import methods

    return [
        {
            "name": method.name,
            "peft_type": method.peft_type or None,  # a refused plugin's type is unknown, not ""
            "package": method.package,
            "version": method.version,
            "state": "loaded" if method.broken is None else f"broken: {method.broken}",
        }
        for method in methods()
    ]


def run(args: argparse.Namespace) -> int:
    found = rows()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("No fine-tuning methods are installed. Install a method's package (pip install peft-<method>); "
              "docs/index.md lists them.")
        return 0
    columns = ("name", "peft_type", "package", "version", "state")
    table = [[str(row[c] if row[c] is not None else "-") for c in columns] for row in found]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    for cells in ([c.upper() for c in columns], *table):
        # The last column (a refusal reason can be long) is not padded.
        print("  ".join(cell.ljust(w) for cell, w in zip(cells[:-1], widths[:-1], strict=True)) + "  " + cells[-1])
    return 0
