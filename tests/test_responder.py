"""The embedded assistant's responder, on the shipped help-desk file."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.responder import load_assistant


@pytest.fixture(scope="module")
def desk():
    return load_assistant()


@pytest.mark.parametrize(
    "said, intent",
    [
        ("what are your opening hours", "hours"),
        ("how much does it cost", "pricing"),
        ("I would like to book an appointment", "booking"),
        ("can I talk to a person", "person"),
        ("ok goodbye", "goodbye"),
    ],
)
def test_demo_intents_are_recognised(desk, said: str, intent: str) -> None:
    _, responder = desk
    assert responder.reply(said).intent == intent


def test_unknown_request_repeats_what_was_heard(desk) -> None:
    _, responder = desk
    reply = responder.reply("Do you sell Bicycles?")
    assert reply.intent is None
    assert "do you sell bicycles" in reply.text


def test_empty_input_asks_again(desk) -> None:
    _, responder = desk
    assert responder.reply("  ...").text.startswith("Sorry")


def test_follow_up_needs_its_context(desk) -> None:
    _, responder = desk
    assert responder.reply("tuesday please").intent is None
    booked = responder.reply("tuesday please", previous_intent="booking")
    assert booked.intent == "booking-day"
    assert "tuesday" in booked.text


def test_goodbye_hangs_up_and_person_transfers(desk) -> None:
    _, responder = desk
    assert responder.reply("bye").hangup
    assert responder.reply("get me a human").transfer


def test_settings_come_from_the_file(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text(
        '[assistant]\nfirst_message = "Ahoy"\nrate_wpm = 150\n[turns]\nendpoint_silence_ms = 700\n'
        '[[intents]]\nname = "x"\nkeywords = ["boat"]\nanswer = "Boats: {heard}"\n'
    )
    config, responder = load_assistant(f)
    assert config.first_message == "Ahoy" and config.rate_wpm == 150
    assert config.turns["endpoint_silence_ms"] == 700
    assert responder.reply("a boat").text == "Boats: a boat"
