"""Bad lines of JSON-lines files: the first few named, the rest counted, and a file of no JSON refused in one line.

Fine-tuning examples, language-model JSON lines and multiple-choice questions all read files that may be
something else (plain text under a .jsonl name, or given the wrong format): one error then names the file,
its first line and what to do, instead of a warning for each of its thousands of lines.
"""

from __future__ import annotations

import logging

from trainer.errors import ConfigError

WARNED_LINES = 5  # bad lines named per file; the rest are counted
NOT_JSON_LINES = 5  # a file whose first this many lines are no JSON objects is not JSON lines: one error, no warnings


class BadLines:
    """One file's skipped lines: `skip` collects them, `report` logs the first few and a count of the rest.

    When a file's first NOT_JSON_LINES lines are all no JSON objects (and none was usable), `skip` raises one
    ConfigError naming the first of them and `refusal` (what reads the file, and the fix) instead.
    """

    def __init__(self, path: str, refusal: str, warning: str = 'data: skipping %s:%d: %s'):
        self.path, self._refusal, self._warning = path, refusal, warning
        self._named: list[tuple[int, str]] = []
        self.count = 0  # lines skipped
        self._not_json: list[tuple[int, str]] = []  # up to NOT_JSON_LINES of them, while none was usable
        self._usable = False

    def used(self) -> None:
        """A line of the file was usable: it is JSON lines, whatever comes after."""
        self._usable = True

    def skip(self, number: int, why: str, not_json: bool) -> None:
        """Line `number` is skipped because `why`; `not_json`: it is no JSON object at all."""
        self.count += 1
        if len(self._named) < WARNED_LINES:
            self._named.append((number, why))
        if not_json and not self._usable:
            self._not_json.append((number, why))
            if len(self._not_json) == NOT_JSON_LINES:
                self.refuse()

    def refuse(self) -> None:
        """Raises the ConfigError of a file that is not JSON lines, if no line was usable and some were no JSON."""
        if self._usable or not self._not_json:
            return
        (first, why), lines = self._not_json[0], len(self._not_json)
        raise ConfigError(
            f'{self.path} is not JSON lines ({self.path}:{first}: {why}; no JSON object in its first {lines} '
            f'line{"s" if lines > 1 else ""}), but {self._refusal}'
        )

    def report(self) -> int:
        """Logs the named lines and the count of the others; returns how many were skipped."""
        for number, why in self._named:
            logging.warning(self._warning, self.path, number, why)
        if self.count > len(self._named):
            logging.warning('data: skipping %d more bad lines in %s', self.count - len(self._named), self.path)
        return self.count
