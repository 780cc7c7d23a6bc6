"""The embedded assistant's brain: intents with keywords and answers, read from a TOML file.

Small and predictable on purpose: the offline demo must answer the same way every time, and a user
changes what it says by editing `assistant.toml`, not code. The same responder serves voice calls
(the local backend) and the text chat API.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path(__file__).with_name("assistant.toml")
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class Intent:
    name: str
    keywords: tuple[str, ...]
    answer: str
    after: str | None = None  #: only matches right after this intent
    hangup: bool = False  #: the call ends after the answer
    transfer: bool = False  #: the caller is handed to a person after the answer


@dataclass(frozen=True)
class Reply:
    text: str
    intent: str | None  #: the intent answered, None for the fallback
    hangup: bool = False
    transfer: bool = False


@dataclass(frozen=True)
class AssistantConfig:
    name: str = "Assistant"
    first_message: str = "Hello! How can I help you today?"
    voice: str = "en-us"
    rate_wpm: int = 175
    apology: str = "Sorry, I am having trouble right now. Goodbye."
    handoff: str = "Please hold while I connect you to a person."
    transfer_digit: str = ""
    turns: dict[str, float] = field(default_factory=dict)
    #: "phrases" (a language model of what the assistant expects to hear) or "general"
    recognition_model: str = "phrases"
    #: sentences the recognizer should expect, besides the intents' keywords
    recognition_examples: tuple[str, ...] = ()


class Responder:
    def __init__(self, intents: list[Intent], fallback: str, empty: str) -> None:
        self.intents = intents
        self.fallback = fallback
        self.empty = empty

    def phrases(self) -> list[str]:
        """Everything the responder can react to, one phrase each (for a recognizer's model)."""
        return [k for intent in self.intents for k in intent.keywords]

    def reply(self, text: str, previous_intent: str | None = None) -> Reply:
        """The answer to one user message; `previous_intent` is the context of the conversation."""
        heard = " ".join(_WORD.findall(text.lower()))
        if not heard:
            return Reply(self.empty, None)
        padded = f" {heard} "
        best: tuple[int, Intent, str] | None = None
        for intent in self.intents:
            if intent.after is not None and intent.after != previous_intent:
                continue
            hits = [k for k in intent.keywords if f" {k} " in padded]
            if not hits:
                continue
            # Follow-ups win over fresh intents when their context holds.
            score = len(hits) + (10 if intent.after else 0)
            if best is None or score > best[0]:
                best = (score, intent, hits[0])
        if best is None:
            return Reply(self.fallback.format(heard=heard), None)
        _, intent, match = best
        return Reply(
            intent.answer.format(heard=heard, match=match), intent.name, intent.hangup,
            intent.transfer,
        )


def load_assistant(path: str | Path | None = None) -> tuple[AssistantConfig, Responder]:
    """Reads an assistant file (the shipped demo when `path` is None)."""
    data: dict[str, Any] = tomllib.loads(Path(path or DEFAULT_FILE).read_text())
    meta = data.get("assistant", {})
    config = AssistantConfig(
        name=meta.get("name", AssistantConfig.name),
        first_message=meta.get("first_message", AssistantConfig.first_message),
        voice=meta.get("voice", AssistantConfig.voice),
        rate_wpm=int(meta.get("rate_wpm", AssistantConfig.rate_wpm)),
        apology=meta.get("apology", AssistantConfig.apology),
        handoff=meta.get("handoff", AssistantConfig.handoff),
        transfer_digit=str(meta.get("transfer_digit", AssistantConfig.transfer_digit)),
        turns={k: float(v) for k, v in data.get("turns", {}).items()},
        recognition_model=data.get("recognition", {}).get("model", "phrases"),
        recognition_examples=tuple(data.get("recognition", {}).get("examples", ())),
    )
    intents = [
        Intent(
            name=item["name"],
            keywords=tuple(k.lower() for k in item["keywords"]),
            answer=item["answer"],
            after=item.get("after"),
            hangup=bool(item.get("hangup", False)),
            transfer=bool(item.get("transfer", False)),
        )
        for item in data.get("intents", [])
    ]
    fallback = data.get("fallback", {})
    return config, Responder(
        intents,
        fallback.get("answer", "I heard: {heard}."),
        fallback.get("empty", "Sorry, I did not catch that."),
    )
