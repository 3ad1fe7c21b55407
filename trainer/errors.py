"""Errors the trainer reports to the user as one clear line (exit code 2, no traceback)."""

from __future__ import annotations

from prompts.errors import RankoneError


class TrainerError(RankoneError):
    """Bad options, bad data or artifacts that do not fit: what was wrong and what to do."""
