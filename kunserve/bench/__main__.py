"""``python -m kunserve.bench <subcommand> [args]``: runs ``kunserve.bench.<subcommand>.main``."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import kunserve.bench


def subcommands() -> list[str]:
    """Public modules of this package that define ``main`` (helpers such as ``metrics`` do not)."""
    names = [m.name for m in pkgutil.iter_modules(kunserve.bench.__path__) if not m.name.startswith("_")]
    return sorted(n for n in names if hasattr(importlib.import_module(f"kunserve.bench.{n}"), "main"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(f"usage: python -m kunserve.bench {{{','.join(subcommands())}}} [args]  "
              f"(<subcommand> --help for its arguments)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        module = importlib.import_module(f"kunserve.bench.{argv[0]}")
    except ModuleNotFoundError as e:
        if e.name != f"kunserve.bench.{argv[0]}":
            raise  # the subcommand exists but needs something that is not installed
        module = None
    if module is None or not hasattr(module, "main"):
        print(f"unknown subcommand {argv[0]!r}; choose from {subcommands()}")
        return 2
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0  # some subcommands return their result dict


if __name__ == "__main__":
    sys.exit(main())
