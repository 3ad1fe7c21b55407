"""The error type handlers raise and the HTTP layer answers as is (see service/api/errors.py)."""

from __future__ import annotations


class ApiError(Exception):
    """An error the HTTP layer answers as is."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
