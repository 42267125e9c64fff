"""One exception root for the AppStore; subclasses carry a stable reason code.

Only the web layer (:mod:`appstore.api`) and the CLI (:mod:`appstore.cli`) turn
these into HTTP status codes / exit codes, each in one place, from the class
attributes ``status`` and ``exit_code``.
"""

from __future__ import annotations

from typing import Any


class AppStoreError(Exception):
    """Root of every error :mod:`appstore` raises on purpose.

    ``reason`` is a short stable code (a JSON ``error`` value and a counter
    label); ``detail`` says what exactly, for a person.
    """

    status = 400
    exit_code = 1
    default_reason = "error"

    def __init__(self, reason: str | None = None, detail: Any = "") -> None:
        self.reason = reason or self.default_reason
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)


class ConfigError(AppStoreError):
    """Our own config is wrong (unknown key, bad value); says key path + value."""

    default_reason = "bad_config"
    exit_code = 2


class BadRequest(AppStoreError):
    """The caller sent something we cannot use (bad JSON, bad id)."""

    default_reason = "bad_request"


class PackageRejected(AppStoreError):
    """An app package that cannot be published: corrupt, unsigned, untrusted,
    tampered with, or whose manifest does not match its model."""

    default_reason = "bad_package"


class TooLarge(AppStoreError):
    status = 413
    default_reason = "too_large"


class NotFound(AppStoreError):
    status = 404
    default_reason = "not_found"


class Conflict(AppStoreError):
    """E.g. re-publishing name+version with different content."""

    status = 409
    default_reason = "conflict"


class Forbidden(AppStoreError):
    """E.g. an enrolment token that was never issued."""

    status = 403
    default_reason = "forbidden"


class Gone(AppStoreError):
    """E.g. an enrolment token past its expiry."""

    status = 410
    default_reason = "gone"


class SigningKeyError(AppStoreError):
    """The publisher key is missing, unreadable or of the wrong kind."""

    default_reason = "bad_key"
    exit_code = 2


class ApiUnreachable(AppStoreError):
    """The CLI could not reach the AppStore REST API."""

    status = 503
    default_reason = "unreachable"
    exit_code = 3
