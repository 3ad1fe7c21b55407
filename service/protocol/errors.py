"""The error body every route answers with: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. invalid_request, not_found, queue_full")
    message: str = Field(description="what was wrong, and what to do about it")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str
