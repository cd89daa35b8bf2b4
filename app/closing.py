"""What closing the app does while a training run is active (no GUI code here).

The window's close button and File > Quit both call :meth:`ExitFlow.request`. Without an active
training run the app closes at once; with one, the shell shows a question with the three
:data:`CHOICES` and passes the answer to :meth:`ExitFlow.answer`.
"""
from __future__ import annotations

from typing import Callable

#: The answers of the exit question: (key, button label).
CHOICES = (
    ("stop", "Stop training (checkpoint saved, can be resumed)"),
    ("keep", "Keep it running in the background"),
    ("cancel", "Cancel"),
)
QUESTION = "A training run is active. What should happen to it when the app closes?"


class ExitFlow:
    """The exit decision.

    Args:
        training_active: returns True while a training process runs (the Train tab's ``training_active``).

    After :meth:`request` returned "close", or :meth:`answer` returned True, the app should stop;
    :attr:`keep_training` then says whether the run is left going (``close(keep_running=...)``).
    """

    def __init__(self, training_active: Callable[[], bool]) -> None:
        self._active = training_active
        self.asking = False  # the question is on screen
        self.keep_training = False
        self.closing = False

    def request(self) -> str:
        """The user asked to quit: "close" (stop the app now) or "ask" (show the question)."""
        if self.closing:
            return "close"
        if self.asking:
            return "ask"  # a second click on the close button while the question is shown
        if not self._active():
            self.keep_training = False
            self.closing = True
            return "close"
        self.asking = True
        return "ask"

    def answer(self, choice: str) -> bool:
        """The answer to the question ("stop" | "keep" | "cancel"); True when the app should close."""
        if choice not in {k for k, _ in CHOICES}:
            raise ValueError(f"unknown exit choice '{choice}' (choose {', '.join(k for k, _ in CHOICES)})")
        self.asking = False
        if choice == "cancel":
            return False
        self.keep_training = choice == "keep"
        self.closing = True
        return True
