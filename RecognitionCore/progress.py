"""Progress reporting and cooperative cancel, one object for the Widget, the command line and the tests.

Long operations take a ``Progress`` and call ``progress.report(fraction, message)`` between steps. Reporting is also
where cancel is honoured: if the user asked to cancel, ``report`` raises ``Cancelled`` so the operation unwinds
through its normal cleanup (nothing half-made is left in the scene).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[float, str], None]


class CancelToken:
    """Set from any thread (the Cancel button); checked by the worker at each progress report."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Progress:
    """Reports a fraction in [0, 1] and a message; ``sub(start, end)`` maps a step onto part of the parent range."""

    def __init__(self, callback: Optional[ProgressCallback] = None, cancel_token: Optional[CancelToken] = None,
                 start: float = 0.0, end: float = 1.0) -> None:
        self.callback = callback
        self.cancel_token = cancel_token or CancelToken()
        self.start = start
        self.end = end

    def report(self, fraction: float, message: str = "") -> None:
        """Forward the overall fraction to the callback, then raise ``Cancelled`` if cancel was requested."""
        self.check_cancelled()
        if self.callback is not None:
            clamped = min(max(float(fraction), 0.0), 1.0)
            self.callback(self.start + clamped * (self.end - self.start), message)

    def check_cancelled(self) -> None:
        if self.cancel_token.cancelled:
            raise Cancelled("Cancelled by the user; no results were added to the scene.")

    def sub(self, start: float, end: float) -> "Progress":
        """A child reporter whose [0, 1] covers [start, end] of this one (shares the cancel token)."""
        span = self.end - self.start
        return Progress(self.callback, self.cancel_token, self.start + start * span, self.start + end * span)


def as_progress(progress: Optional[Progress]) -> Progress:
    """Functions accept ``None`` for 'no reporting'; this turns it into a silent reporter."""
    return progress if progress is not None else Progress()
