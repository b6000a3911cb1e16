"""The error every configuration problem becomes: it names the key and the fix."""

from __future__ import annotations

import difflib
from typing import Iterable, Union


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key and the fix."""

    def __init__(self, problems: Union[str, list[str]], headline: str = "invalid configuration"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{headline}:\n{lines}")


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
