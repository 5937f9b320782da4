"""What every command-line script here shares: bad input reported as one line, never a traceback.

Usage errors name what is wrong and where, end with "(see --help)" and exit 2; `run_cli` turns
the errors a script expects into the same one line and exit 2, and Ctrl-C into exit 130.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what and where), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only where there is a default worth showing."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def run_cli(prog: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
            errors: tuple[type[BaseException], ...], interrupted: str = "interrupted") -> int:
    """`run(args)`, with `errors` printed as "PROG: error: <first line>" (exit 2) and Ctrl-C as exit 130."""
    try:
        return run(args)
    except errors as e:
        print(f"{prog}: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
