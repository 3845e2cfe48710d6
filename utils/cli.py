"""How every command fails: a problem the user can fix becomes one line on stderr and exit status 2.

Each entry point ends with `run_cli(lambda: main(args))`. Our own errors derive from `UserError` and carry
a message that names the file or setting and the fix; they print without a traceback (set
`SYNCHFORMER_DEBUG=1` to see it). Any other exception is a bug and keeps its traceback."""

import argparse
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn


class UserError(Exception):
    """A problem with the user's input or environment (a bad file, setting or device), not with the code."""


class SettingError(UserError, ValueError):
    """A command-line setting that cannot work here, e.g. `--device cuda` on a machine without a GPU."""


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Runs `main` and exits with its return value (None: 0), or with 2 after one line for a `UserError`."""
    try:
        code = main()
    except UserError as e:
        if os.environ.get("SYNCHFORMER_DEBUG"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def report_skipped(skipped: Sequence[tuple[str, str]], n_done: int, what: str = "scored") -> int:
    """Lists the items a folder command skipped with their reasons; the exit status: 0 if anything was
    `what`, else 1."""
    if skipped:
        print(f"Skipped {len(skipped)} item(s):", file=sys.stderr)
        for name, reason in skipped:
            print(f"  {name}: {reason}", file=sys.stderr)
    return 0 if n_done else 1


def number(kind: type, low: float, above: bool = False) -> Callable[[str], float]:
    """An argparse `type=`: a finite `kind` (int or float) >= `low` (> `low` when `above`). Anything else
    (`0`, `-1`, `nan`, `inf`, `abc`) is argparse's one-line error naming the option, with exit status 2."""

    def parse(text: str):
        value = kind(text)  # a ValueError: argparse's "invalid int value"
        if not (math.isfinite(value) and (value > low if above else value >= low)):
            raise argparse.ArgumentTypeError(f"expected a finite {kind.__name__} {'>' if above else '>='} {low}")
        return value

    parse.__name__ = kind.__name__
    return parse
