"""One exception root for the contract package; subclasses carry fields."""


class CloudSyncError(Exception):
    """Root of every error raised by :mod:`cloud_sync`."""


class MessageRejected(CloudSyncError):
    """An MQTT message that does not match its schema.

    ``reason`` is a short stable code (``oversized``, ``not_json``, ``bad_schema``,
    ``unsupported_version``, ``bad_topic``, ``bad_frame``) used as a counter label;
    ``detail`` is the human-readable why.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class PackageError(CloudSyncError):
    """An app package that cannot be trusted or used.

    ``reason`` is a stable code (``corrupt``, ``unsigned``, ``bad_signature``,
    ``untrusted_key``, ``hash_mismatch``, ``bad_manifest``, ``tensor_mismatch``,
    ``too_large``); ``detail`` says what exactly.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class BlobError(CloudSyncError):
    """A blob transfer that failed for good (unknown blob, size or hash mismatch)."""

    def __init__(self, sha256: str, reason: str) -> None:
        self.sha256 = sha256
        self.reason = reason
        super().__init__(f"blob {sha256[:12]}: {reason}")


class OutboxFull(CloudSyncError):
    """The durable outbox holds ``max_rows`` unsent messages and refuses more.

    Raised instead of dropping anything: the caller decides what to evict (and
    counts it), the outbox never drops silently.
    """

    def __init__(self, pending: int, max_rows: int) -> None:
        self.pending = pending
        self.max_rows = max_rows
        super().__init__(f"outbox full: {pending} unsent messages (limit {max_rows})")
