"""Command lines that take coordinates as users write them: ``--bbox -122.5,37.7,-122.4,37.8``.

argparse reads a value that starts with ``-`` and is not a plain number as an option, so a bbox
with a western or southern first coordinate stops with "expected one argument". `attach_values`
joins such a value to its option (``--bbox=-122.5,...``) before argparse sees it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# A negative number, or a list of numbers that starts with one: "-0.9", "-122.5,37.7,...",
# "-1e-3 2" (space-separated inside one quoted argument).
_NEGATIVE_NUMBERS = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:[,;\s]+[-+]?[\d.eE+-]+)*$")


def attach_values(argv: Sequence[str], options: Iterable[str]) -> list[str]:
    """``argv`` with each of ``options`` followed by a negative-number value written as
    ``OPTION=VALUE``, which argparse reads as the option's value."""
    names = set(options)
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in names and i + 1 < len(args) and _NEGATIVE_NUMBERS.match(args[i + 1]):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        if arg == "--":  # everything after is positional
            out.extend(args[i:])
            break
        out.append(arg)
        i += 1
    return out
