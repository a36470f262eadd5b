"""User-facing errors.

Every problem a user can cause (bad config, bad data, missing files, a run that cannot fit) raises
`LorafuseError` with two parts: what is wrong, and how to fix it. The CLI prints both and exits with
status 2, without a traceback unless `--debug` is given. Internal bugs stay ordinary exceptions.
"""

from __future__ import annotations


class LorafuseError(Exception):
    """A problem the user can fix. `fix` says how, in one or two sentences."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


class ConfigError(LorafuseError):
    """An invalid configuration value or key."""


class DataError(LorafuseError):
    """A data file or row that cannot be used."""


class ModelError(LorafuseError):
    """A model folder, tokenizer or adapter that cannot be used."""
