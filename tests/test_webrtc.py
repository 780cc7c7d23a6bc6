"""The browser path without a browser: aiortc peers against the engine's WebRTC transport on real
sockets (loopback, and an impaired link between two network namespaces), and its receive path
driven on a synthetic clock."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer as AiortcJitterBuffer
from aiortc.rtp import RtpPacket

from bench.webrtc import WebRTCCaller, serve_webrtc
from engine.config import Settings
from engine.transports.webrtc import (
    OpusEncoder,
    OpusReceivePath,
    advertise_opus_receive_options,
    ice_servers,
)
from tests.netns import ImpairedLink, LinkUnavailable, unavailable_reason
from tests.speech import speech
from tests.twilio_helpers import until

REPO = Path(__file__).resolve().parent.parent


def tone(ms: float, freq: float = 440.0, level: float = 0.3) -> bytes:
    t = np.arange(int(16 * ms)) / 16000.0
    return (level * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def opus_packets(pcm: bytes) -> list[bytes]:
    encoder = OpusEncoder()
    return [encoder.encode(pcm[i : i + 640]) for i in range(0, len(pcm) - 639, 640)]


def rms(frame: bytes) -> float:
    x = np.frombuffer(frame, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


# -- the receive path on a synthetic clock ---------------------------------------------------------


def test_in_order_packets_come_out_as_16khz_frames_at_once() -> None:
    frames: list[bytes] = []
    path = OpusReceivePath(lambda frame, now: frames.append(frame))
    for i, packet in enumerate(opus_packets(tone(200))):
        path.push(40000 + i, 960 * i, packet, now=20.0 * i)
        assert len(frames) == i + 1  # released on arrival: no prefetch, no added delay
    assert all(len(f) == 640 for f in frames)
    assert rms(b"".join(frames[3:])) > 3000  # the tone, decoded
    assert path.stats()["concealed"] == 0


def test_a_lost_packet_becomes_concealment_when_it_is_due_never_a_stall() -> None:
    frames: list[tuple[float, bytes]] = []
    path = OpusReceivePath(lambda frame, now: frames.append((now, frame)))
    packets = opus_packets(tone(600))
    for i, packet in enumerate(packets):
        if i == 10:
            continue  # lost on the way
        path.push(i, 960 * i, packet, now=20.0 * i)
    assert len(frames) == len(packets)  # one frame per packet sent, the lost one included
    assert path.stats()["concealed"] == 1
    released_at = [t for t, _ in frames]
    assert released_at[10] == released_at[11] == 220.0  # concealed as soon as 11 showed it overdue
    assert rms(frames[10][1]) > 1000  # Opus PLC carries the tone on; not a hole of silence

    # aiortc's own buffer, given the same packets: nothing for 14 packets (280 ms), and from then
    # on every frame comes out 14 packets late (it releases one frame per packet that arrives).
    stock = AiortcJitterBuffer(capacity=16, prefetch=4)
    released: dict[int, int | None] = {}
    for i, packet in enumerate(packets):
        if i != 10:
            rtp = RtpPacket(payload_type=111, sequence_number=i, timestamp=960 * i)
            rtp._data = packet  # type: ignore[attr-defined]
            frame = stock.add(rtp)[1]
            released[i] = None if frame is None else frame.timestamp // 960
    assert all(released[i] is None for i in range(11, 25))
    assert released[25] == 11 and released[29] == 15


def test_a_reordered_packet_is_waited_for_once_jitter_is_seen() -> None:
    frames: list[bytes] = []
    path = OpusReceivePath(lambda frame, now: frames.append(frame))
    packets = opus_packets(tone(1400))
    rng = random.Random(7)
    # Up to 40 ms of jitter on a 20 ms packet clock, then 51 overtakes 50 by 10 ms.
    arrivals = [20.0 * i + rng.uniform(0.0, 40.0) for i in range(len(packets))]
    arrivals[50], arrivals[51] = 20.0 * 50 + 35.0, 20.0 * 51 + 5.0
    before: dict[str, Any] = {}
    for i in sorted(range(len(packets)), key=lambda k: arrivals[k]):
        path.poll(arrivals[i])
        if i == 50:
            before = path.stats()
            assert before["depth"] == 1  # 51 is held, waiting for 50
        path.push(i, 960 * i, packets[i], now=arrivals[i])
        if i == 50:
            after = path.stats()
            assert after["reordered"] == before["reordered"] + 1
            assert after["late"] == before["late"] and after["concealed"] == before["concealed"]
            assert after["depth"] == 0  # 50 and 51 both released, in order
    assert before["targetDelayMs"] > 20  # the buffer learned the jitter it had to wait for
    assert len(frames) == len(
        packets
    )  # one frame per packet: a late one was concealed in its place


def test_the_answer_advertises_what_the_engine_decodes_best() -> None:
    sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\na=mid:0\r\n"
    out = advertise_opus_receive_options(sdp)
    assert (
        "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 useinbandfec=1;maxplaybackrate=16000;stereo=0\r\n"
        in out
    )
    assert advertise_opus_receive_options(out) == out  # an existing fmtp is left alone


def test_ice_servers_take_stun_and_turn_with_credentials() -> None:
    stun, turn = ice_servers(
        ["stun:stun.example.org:3478", "turn:alice:s3cret@turn.example.org:3478?transport=udp"]
    )
    assert stun.urls == "stun:stun.example.org:3478" and stun.username is None
    assert turn.urls == "turn:turn.example.org:3478?transport=udp"
    assert (turn.username, turn.credential) == ("alice", "s3cret")


# -- offers ----------------------------------------------------------------------------------------


async def test_an_offer_is_answered_with_opus_only_and_every_candidate() -> None:
    async with serve_webrtc(Settings(backend="echo")) as served, aiohttp.ClientSession() as http:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        async with http.post(
            served.url + "/webrtc/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
        await pc.close()
        assert body["type"] == "answer" and body["sessionId"] in served.engine.calls
        sdp = body["sdp"]
        assert "opus/48000" in sdp and "PCMU" not in sdp and "G722" not in sdp
        assert "a=candidate:" in sdp  # gathered before answering: no trickle
        assert "useinbandfec=1" in sdp
        assert "a=sendrecv" in sdp


BAD_OFFERS = [
    (b"not json at all", 400, "JSON"),
    (b'["sdp", "offer"]', 400, "object"),
    (json.dumps({"sdp": "v=0", "type": "answer"}).encode(), 400, "offer"),
    (json.dumps({"type": "offer"}).encode(), 400, "sdp"),
    (json.dumps({"sdp": "", "type": "offer"}).encode(), 400, "sdp"),
    (
        json.dumps({"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "type": "offer"}).encode(),
        400,
        "audio",
    ),
    (json.dumps({"sdp": "m=audio garbage\r\n\x00\xff" * 3, "type": "offer"}).encode(), 400, "SDP"),
    (
        json.dumps(
            {
                "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\n" * 2000,
                "type": "offer",
            }
        ).encode(),
        413,
        "larger",
    ),
]


async def test_bad_offers_are_refused_and_leave_nothing_behind() -> None:
    async with serve_webrtc(Settings(backend="echo")) as served, aiohttp.ClientSession() as http:
        threads = threading.active_count()
        for body, status, words in BAD_OFFERS:
            async with http.post(
                served.url + "/webrtc/offer",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == status, body[:60]
                assert words in (await resp.json())["error"], body[:60]
        # A well-formed audio offer the engine cannot use (no Opus) is refused the same way.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        no_opus = "\r\n".join(
            line for line in pc.localDescription.sdp.split("\r\n") if "opus" not in line.lower()
        )
        no_opus = no_opus.replace(" 96 ", " ").replace(" 96\r\n", "\r\n")
        await pc.close()
        async with http.post(
            served.url + "/webrtc/offer", json={"sdp": no_opus, "type": "offer"}
        ) as resp:
            assert resp.status == 400
        assert served.sessions.sessions == {}
        assert served.engine.calls == {}
        assert threading.active_count() == threads  # no decoder threads left running


async def test_an_overloaded_engine_sheds_new_offers() -> None:
    async with serve_webrtc(Settings(backend="echo")) as served, aiohttp.ClientSession() as http:
        served.engine.loop_lag_ms = 10_000.0
        caller = WebRTCCaller(served.url, http=http)
        with pytest.raises(RuntimeError, match="503"):
            await caller.connect()
        await caller.hangup()
        assert served.engine.metrics.calls_shed == 1
        assert served.sessions.sessions == {} and served.engine.calls == {}


# -- a whole call ----------------------------------------------------------------------------------


def _events(caller: WebRTCCaller, kind: str) -> list[tuple[float, dict[str, Any]]]:
    return [(t, e) for t, e in caller.events if e.get("type") == kind]


async def test_caller_speech_reaches_the_assistant_and_its_spoken_reply_comes_back() -> None:
    async with serve_webrtc(Settings(backend="local")) as served, aiohttp.ClientSession() as http:
        caller = WebRTCCaller(served.url, http=http)
        await caller.connect()
        await until(lambda: caller.onsets, 5.0, "the greeting's audio")
        # Spoken over the greeting: a barge-in, then a question the assistant answers.
        question = caller.speak(speech("what are your opening hours"))
        await question.done.wait()
        assert question.last_voiced_sent is not None
        end = question.last_voiced_sent
        await until(lambda: caller.first_onset_after(end) is not None, 10.0, "the reply's audio")
        reply_heard = caller.first_onset_after(end)
        assert reply_heard is not None
        await until(
            lambda: caller.loud_frames_between(reply_heard, reply_heard + 500.0) > 10,
            5.0,
            "half a second of the reply",
        )
        await caller.hangup()
        await until(lambda: not served.sessions.sessions, 5.0, "the session to end")

    finals = [
        e["text"] for _, e in _events(caller, "transcript") if e["final"] and e["role"] == "user"
    ]
    assert any("hours" in text for text in finals)
    replies = [e["text"] for _, e in _events(caller, "assistant")]
    assert replies[0] == "Hello! How can I help you today?" and "open" in replies[-1]
    assert _events(caller, "latency")
    # The greeting paused at the first frame of speech over it, was cancelled once the speech
    # lasted, and nothing of it came after (the page learns of the cancel over its socket).
    steps = [(t, e) for t, e in _events(caller, "barge-in")]
    assert steps[0][1]["step"] == "paused"
    cancelled_at = next(t for t, e in steps if e["step"] == "cancelled" and e["generation"] == 1)
    assert caller.loud_frames_between(cancelled_at + 100.0, reply_heard) == 0
    assert served.engine.calls == {}


async def test_an_assistant_goodbye_plays_out_before_the_engine_hangs_up() -> None:
    async with serve_webrtc(Settings(backend="local")) as served, aiohttp.ClientSession() as http:
        caller = WebRTCCaller(served.url, http=http)
        await caller.connect()
        await until(
            lambda: any(e.get("state") == "listening" for _, e in caller.events),
            8.0,
            "the greeting to be heard",
        )
        bye = caller.speak(speech("no thanks goodbye"))
        await bye.done.wait()
        await until(lambda: not served.sessions.sessions, 15.0, "the engine to hang up")
        await until(lambda: any(e.get("type") == "end" for _, e in caller.events), 5.0, "the end")
        assert bye.last_sent is not None
        goodbye_frames = caller.loud_frames_between(bye.last_sent, float("inf"))
        await caller.hangup()
    replies = [e["text"] for _, e in _events(caller, "assistant")]
    assert replies[-1] == "Thank you for calling. Goodbye!"
    assert goodbye_frames > 40  # most of the goodbye's ~1.6 s was heard, not cut by the hang-up
    assert _events(caller, "end")[0][1]["reason"] != "page-closed"  # the engine ended it
    assert served.engine.calls == {}


async def test_the_stock_aiortc_media_path_relays_audio_too() -> None:
    async with (
        serve_webrtc(Settings(backend="echo"), media="aiortc") as served,
        aiohttp.ClientSession() as http,
    ):
        caller = WebRTCCaller(served.url, http=http)
        await caller.connect()
        utt = caller.speak(tone(400, level=0.5))
        await utt.done.wait()
        assert utt.first_loud_sent is not None
        sent = utt.first_loud_sent
        await until(lambda: caller.first_onset_after(sent) is not None, 5.0, "the echo")
        session = next(iter(served.sessions.sessions.values()))
        assert session.receive_path is None and session.frames_in > 0
        await caller.hangup()


async def test_deleting_the_session_ends_the_browser_call() -> None:
    from engine import chat

    async with (
        serve_webrtc(Settings(backend="echo"), setup=chat.setup_routes) as served,
        aiohttp.ClientSession() as http,
    ):
        caller = WebRTCCaller(served.url, http=http)
        await caller.connect()
        assert caller.session_id in served.engine.calls
        async with http.delete(f"{served.url}/session/{caller.session_id}") as resp:
            assert resp.status == 200
        await until(lambda: not served.sessions.sessions, 5.0, "the browser session to end")
        await until(
            lambda: any(e.get("type") == "end" for _, e in caller.events),
            5.0,
            "the page to be told",
        )
        assert served.engine.calls == {}
        await caller.hangup()


async def test_closing_the_page_socket_ends_the_session() -> None:
    async with serve_webrtc(Settings(backend="echo")) as served, aiohttp.ClientSession() as http:
        caller = WebRTCCaller(served.url, http=http)
        await caller.connect()
        session = served.sessions.sessions[caller.session_id]  # type: ignore[index]
        assert caller._ws is not None
        await caller._ws.close()
        await until(lambda: not served.sessions.sessions, 5.0, "the session to end")
        assert session.close_reason == "page-closed"
        assert session.pc.connectionState == "closed" and served.engine.calls == {}
        await caller.hangup()


async def test_a_failed_connection_is_reported_to_the_page_before_the_end() -> None:
    async with serve_webrtc(Settings(backend="echo")) as served, aiohttp.ClientSession() as http:
        caller = WebRTCCaller(served.url, http=http)
        await caller.connect()
        session = served.sessions.sessions[caller.session_id]  # type: ignore[index]
        await session.close("connection-failed")  # what connectionstatechange "failed" does
        await until(lambda: any(e.get("type") == "end" for _, e in caller.events), 5.0, "the end")
        await caller.hangup()
    kinds = [e["type"] for _, e in caller.events]
    assert kinds[-3:] == ["stats", "error", "end"]
    assert "failed" in caller.events[-2][1]["message"]
    assert served.engine.calls == {}


async def test_fifty_sessions_open_and_close_leave_nothing_behind() -> None:
    # No keep-alive: an idle pooled HTTP connection keeps a server task, which is not a leak.
    async with (
        serve_webrtc(Settings(backend="echo")) as served,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
    ):
        await asyncio.sleep(0.05)
        tasks_before = len(asyncio.all_tasks())
        threads_before = threading.active_count()
        peers: list[weakref.ref[Any]] = []
        tracks: list[weakref.ref[Any]] = []
        for batch in range(10):
            callers = [
                WebRTCCaller(served.url, http=http, events=(batch % 2 == 0)) for _ in range(5)
            ]
            await asyncio.gather(*(c.connect() for c in callers))
            for c in callers:
                session = served.sessions.sessions[c.session_id]  # type: ignore[index]
                peers += [weakref.ref(session.pc), weakref.ref(c.pc)]
                tracks += [weakref.ref(session.track), weakref.ref(c.track)]
            # Half hang up through the page's socket, half just drop the peer connection.
            await asyncio.gather(*(c.hangup() for c in callers))
        await until(
            lambda: not served.sessions.sessions and not served.engine.calls,
            10.0,
            "every session to end",
        )
        await until(lambda: len(asyncio.all_tasks()) <= tasks_before, 10.0, "tasks to finish")
        await until(
            lambda: threading.active_count() <= threads_before, 10.0, "decoder threads to end"
        )
        del callers, c, session
        gc.collect()
        assert len(peers) == 100
        assert [p for p in peers if p() is not None] == []
        assert [t for t in tracks if t() is not None] == []
        assert served.engine.metrics.active_calls == 0


async def test_the_page_and_its_files_are_served() -> None:
    async with serve_webrtc(Settings(backend="echo")) as served, aiohttp.ClientSession() as http:
        async with http.get(served.url + "/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            page = await resp.text()
        assert "/web/app.js" in page and "/web/style.css" in page
        for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            async with http.get(served.url + "/web/" + name) as resp:
                assert resp.status == 200 and kind in resp.content_type
        async with http.get(served.url + "/web/../transports/webrtc.py") as resp:
            assert resp.status in (403, 404)
        async with http.get(served.url + "/webrtc/config") as resp:
            assert (await resp.json())["iceServers"] == []
        async with http.get(served.url + "/webrtc/events/no-such-session") as resp:
            assert resp.status == 404


# -- across an impaired link -----------------------------------------------------------------------


@pytest.mark.slow
def test_the_call_keeps_flowing_with_concealment_across_a_lossy_jittery_link(
    tmp_path: Path,
) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no impaired link: {reason}")
    try:
        link = ImpairedLink(loss=0.05, delay_ms=30.0, jitter_ms=10.0, seed=11)
        link.__enter__()
    except LinkUnavailable as exc:
        pytest.skip(f"no impaired link: {exc}")
    python = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "bench.webrtc"]
    out = tmp_path / "callers.json"
    try:
        with open(tmp_path / "engine.log", "wb") as engine_log:
            engine = subprocess.Popen(
                link.run_in(
                    link.engine_ns, [*python, "_serve", "--host", link.engine_ip, "--port", "8080"]
                ),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=engine_log,
            )
            try:
                assert engine.stdout is not None
                ready = engine.stdout.readline().decode()
                assert ready.startswith("READY"), (tmp_path / "engine.log").read_text()[-2000:]
                done = subprocess.run(
                    link.run_in(
                        link.client_ns,
                        [
                            *python,
                            "_callers",
                            "--url",
                            ready.split()[1],
                            "--calls",
                            "1",
                            "--duration",
                            "6",
                            "--json-out",
                            str(out),
                            "--no-progress",
                        ],
                    ),
                    check=False,
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert done.returncode == 0, done.stderr[-2000:]
            finally:
                engine.terminate()
                engine.wait(10)
                if engine.stdout is not None:
                    engine.stdout.close()
    finally:
        link.close()
    result = json.loads(out.read_text())
    lat = result["latency_ms"]
    print(
        f"\n{link.describe()}\nmouth-to-ear over the link (echo): p50 {lat['p50']} ms, "
        f"p95 {lat['p95']} ms, max {lat['max']} ms over {lat['n']} clicks; engine: "
        f"{result['engine_concealed']} frames concealed of {result['engine_frames_in']}, longest "
        f"stall {result['engine_max_stall_ms']} ms; caller: {result['caller_concealed']} "
        f"concealed, longest stall {result['caller_max_stall_ms']} ms"
    )
    assert result["connected"] == 1 and result["failed"] == 0
    assert result["engine_concealed"] > 0  # packets were lost, and concealed
    assert result["engine_max_stall_ms"] <= 60.0  # ... without the stream ever stopping
    # every frame the caller sent reached the call, as itself or as concealment
    assert result["engine_frames_in"] >= 0.97 * result["frames_sent"]
    assert lat["n"] >= 8 and result["clicks_lost"] <= 1
