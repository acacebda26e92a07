"""One error type for the whole server: an HTTP status, a readable message, the field it is about."""

from __future__ import annotations


class ApiError(Exception):
    """Raised anywhere in the server; rendered as ``{"error": message, "field": field}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers


def bad_request(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, message, field)


def not_found(kind: str, ref: str) -> ApiError:
    return ApiError(404, f"no {kind} {ref}", None)


def conflict(message: str, field: str | None = None) -> ApiError:
    return ApiError(409, message, field)


def forbidden(message: str) -> ApiError:
    return ApiError(403, message)
