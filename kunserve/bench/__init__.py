"""Benchmarks as subcommands: ``python -m kunserve.bench <name> [args]``.

Each public module here (no leading underscore) with a ``main(argv)`` is a subcommand, e.g.
``throughput``; ``python -m kunserve.bench --help`` lists them.
"""
