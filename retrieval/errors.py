"""User-facing errors.

Everything a user can get wrong (a bad manifest, an unreadable image, a
tampered bundle) raises a subclass of :class:`CasebaseError`. The CLI prints
its message and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class CasebaseError(Exception):
    """An error whose message is meant for the user, not the developer."""

    exit_code = 2


class ImageReadError(CasebaseError):
    """An image or mask file could not be read; the message names the file and why."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(CasebaseError):
    """A manifest is unusable as a whole (cannot be parsed, or failed validation)."""


class BundleError(CasebaseError):
    """An index bundle or model folder is missing, corrupted, or from another version."""
