"""Closing the app: the exit decision while a training run is active (app.closing.ExitFlow)."""
import pytest

from app.closing import CHOICES, ExitFlow


class Training:
    """Stands in for the Train tab's ``training_active``."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.active


def test_choices_are_the_three_answers():
    assert [k for k, _ in CHOICES] == ["stop", "keep", "cancel"]
    labels = dict(CHOICES)
    assert "checkpoint" in labels["stop"] and "resumed" in labels["stop"]
    assert "background" in labels["keep"] and labels["cancel"] == "Cancel"


def test_no_training_closes_at_once():
    flow = ExitFlow(Training(False))
    assert flow.request() == "close"
    assert flow.closing and not flow.asking and not flow.keep_training


def test_active_training_asks_and_each_answer():
    for choice, closes, keep in (("stop", True, False), ("keep", True, True), ("cancel", False, False)):
        flow = ExitFlow(Training(True))
        assert flow.request() == "ask" and flow.asking and not flow.closing
        assert flow.request() == "ask"  # a second click while the question is shown: still asking
        assert flow.answer(choice) is closes
        assert not flow.asking and flow.closing is closes and flow.keep_training is keep


def test_cancel_then_ask_again_then_the_run_ends():
    training = Training(True)
    flow = ExitFlow(training)
    assert flow.request() == "ask"
    assert flow.answer("cancel") is False
    assert flow.request() == "ask"  # the run is still active: asks again
    assert flow.answer("keep") is True and flow.keep_training
    training.active = False
    assert flow.request() == "close"  # already closing: no second question


def test_keep_answer_then_run_ended_before_next_request():
    training = Training(True)
    flow = ExitFlow(training)
    flow.request()
    flow.answer("cancel")
    training.active = False  # the run finished meanwhile: closing needs no question
    assert flow.request() == "close" and not flow.keep_training


def test_unknown_answer_is_an_error():
    flow = ExitFlow(Training(True))
    flow.request()
    with pytest.raises(ValueError, match="unknown exit choice"):
        flow.answer("maybe")
    assert flow.asking  # the question stays
