"""Subcommands whose options come from modules imported only when they are chosen.

The benchmark and chaos modules import much of the project; building their parsers eagerly
cost every `raftmesh` command ~1.5 s on a loaded machine, `raftmesh agent up` included
(whose start is part of connection setup: docs/benchmarks.md, connect)."""
from __future__ import annotations

import argparse
import importlib

from .processes import cleaned_up_on_sigterm


class LazyParser(argparse.ArgumentParser):
    """Set `module` (a dotted name, with add_arguments(parser) and main(args)) and the parser
    takes that module's options, its docstring as description and its entry point on first
    use."""

    module: str | None = None
    after_load = None  # optional parser -> None: options common to the family

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()

    def _load(self) -> None:
        if self.module is None:
            return
        mod, self.module = importlib.import_module(self.module), None
        self.description = mod.__doc__
        mod.add_arguments(self)
        if self.after_load is not None:
            self.after_load(self)
        self.set_defaults(func=cleaned_up_on_sigterm(mod.main))
