"""The browser client in a real browser: Debian's Chromium, headless, driven by Playwright, its
microphone faked from a WAV of speech made offline, talking to the engine's embedded assistant."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.webrtc import serve_webrtc
from engine.config import Settings
from tests.speech import silence, speech, write_wav
from tests.twilio_helpers import until

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    # Host candidates as addresses, not mDNS names nobody on this machine answers for.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
SPEAKING = 0.02  # the page's own threshold for "speaking" (RMS, full scale 1.0)


def chromium_or_skip() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            "!!! CHROMIUM IS MISSING: the browser tests did not run. Install Debian's "
            "`chromium` (scripts/test does it when run as root)."
        )
    return CHROMIUM


@contextlib.asynccontextmanager
async def chromium(
    profile: Path, *extra: str, permissions: list[str] | None = None
) -> AsyncIterator[Any]:
    """A fresh headless Chromium profile (the machine's own Chromium, never a downloaded one)."""
    from playwright.async_api import async_playwright

    executable = chromium_or_skip()
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            headless=True,
            args=[*ARGS, *extra],
            permissions=permissions or [],
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield context
        finally:
            await context.close()


async def page_events(page: Any) -> list[dict[str, Any]]:
    return await page.evaluate("window.voice.events")  # type: ignore[no-any-return]


async def test_a_browser_call_is_heard_answered_and_interrupted(tmp_path: Path) -> None:
    # The caller: a pause while the greeting plays, a question, then more speech over the reply.
    wav = tmp_path / "caller.wav"
    write_wav(
        wav,
        silence(4500)
        + speech("what are your opening hours")
        + silence(3000)
        + speech("how much does it cost")
        + silence(9000),
    )
    async with (
        serve_webrtc(Settings(backend="local")) as served,
        chromium(
            tmp_path / "profile",
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop",
        ) as browser,
    ):
        page = await browser.new_page()
        await page.goto(
            served.url + "/?raw=1"
        )  # raw: the test's speech reaches the engine as it is
        await page.click("#call")
        cancelled: dict[str, Any] = {}

        async def reply_interrupted_then_answered() -> bool:
            events = await page_events(page)
            cut = [
                e
                for e in events
                if e["type"] == "barge-in"
                and e["step"] == "cancelled"
                and e.get("generation", 0) >= 2
            ]
            if cut:
                cancelled.update(cut[0])
                return any(e["type"] == "latency" and e["t"] > cut[0]["t"] for e in events)
            return False

        deadline = 40.0
        for _ in range(int(deadline / 0.25)):
            if await reply_interrupted_then_answered():
                break
            await page.wait_for_timeout(250)
        events = await page_events(page)
        assert cancelled, f"no barge-in on the reply; events: {[e['type'] for e in events]}"
        levels: list[dict[str, float]] = await page.evaluate("window.voice.levels")
        transcript = await page.inner_text("#transcript")
        await page.screenshot(path=str(tmp_path / "laptop.png"))
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.screenshot(path=str(tmp_path / "phone.png"))
        print(f"\nscreenshots: {tmp_path / 'laptop.png'} {tmp_path / 'phone.png'}")
        session_id = await page.evaluate("window.voice.sessionId")
        assert session_id in served.sessions.sessions
        await page.click("#call")  # Stop
        await until(
            lambda: not served.sessions.sessions, 10.0, "the session to end when the page stops"
        )
    assert served.engine.calls == {}

    # The engine heard the question, and the page shows it, bold once final.
    finals = [
        e["text"]
        for e in events
        if e["type"] == "transcript" and e["final"] and e["role"] == "user"
    ]
    assert any("hours" in text for text in finals), finals
    assert "hours" in transcript and "open" in transcript.lower()
    # The reply's audio reached the page: a WebAudio analyser on the remote stream measured it.
    reply = next(
        e for e in events if e["type"] == "assistant" and e["generation"] == cancelled["generation"]
    )
    playing = [x["remote"] for x in levels if reply["t"] <= x["t"] < cancelled["t"]]
    assert playing and max(playing) > 5 * SPEAKING
    # Speaking over it stopped it: quiet from shortly after the cancel until the next answer.
    cut_at = cancelled["t"]
    after = [x["remote"] for x in levels if cut_at + 300 <= x["t"] < cut_at + 1000]
    assert after and max(after) < SPEAKING < max(playing)
    steps = [e["step"] for e in events if e["type"] == "barge-in"]
    assert "paused" in steps and "cancelled" in steps


@pytest.mark.parametrize(
    "case, extra, permissions, message",
    [
        ("refused", ["--use-fake-device-for-media-stream"], [], "Microphone access was refused"),
        ("absent", [], ["microphone"], "No microphone was found"),
    ],
)
async def test_a_microphone_refused_or_absent_is_explained(
    tmp_path: Path, case: str, extra: list[str], permissions: list[str], message: str
) -> None:
    async with (
        serve_webrtc(Settings(backend="echo")) as served,
        chromium(tmp_path / "profile", *extra, permissions=permissions) as browser,
    ):
        page = await browser.new_page()
        await page.goto(served.url + "/")
        await page.click("#call")
        await page.wait_for_selector("#alert:not([hidden])", timeout=10_000)
        assert message in await page.inner_text("#alert")
        assert await page.inner_text("#call-label") == "Start"
        assert served.sessions.sessions == {}
