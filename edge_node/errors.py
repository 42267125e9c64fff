"""One exception root for the edge node."""


class EdgeError(Exception):
    """Root of every error the edge node raises on purpose."""


class ConfigError(EdgeError):
    """The node's config is invalid; the message names key path, value and why."""


class InstallError(EdgeError):
    """An app version could not be installed; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = "", transient: bool = False) -> None:
        self.reason = reason
        self.detail = detail
        self.transient = transient
        super().__init__(f"{reason}: {detail}" if detail else reason)
