"""The VAPI stand-in keeps VAPI's protocol: checked with a plain aiohttp client on real sockets."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.servers import serve_app
from tests.vapi_standin import (
    MALFORMED_FRAMES,
    SignedWebhook,
    VapiStandin,
    fire_webhook,
    frames,
    room_noise,
    server_message,
    sign_webhook,
    speech_like,
)

KEY = "standin-test-key"
GOOD_CALL = {
    "assistantId": "asst-1",
    "metadata": {"engineSessionId": "s-1"},
    "transport": {"provider": "vapi.websocket",
                  "audioFormat": {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000}},
}


@pytest.fixture
async def vapi() -> AsyncIterator[VapiStandin]:
    async with VapiStandin(KEY) as standin:
        yield standin


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create_call(http: aiohttp.ClientSession, vapi: VapiStandin) -> dict[str, Any]:
    async with http.post(f"{vapi.base_url}/call", json=GOOD_CALL, headers=auth()) as resp:
        assert resp.status == 201
        return await resp.json()


async def send_turn(ws: aiohttp.ClientWebSocketResponse, speech_ms: int = 600,
                    quiet_ms: int = 700, seed: int = 3) -> None:
    for frame in frames(speech_like(speech_ms, seed=seed)) + frames(room_noise(quiet_ms)):
        await ws.send_bytes(frame)
        await asyncio.sleep(0)


async def read_until(ws: aiohttp.ClientWebSocketResponse, done: Any,
                     log: list[Any]) -> list[Any]:
    """Append (type, payload) to `log` until `done(message)` holds for a text message."""
    async with asyncio.timeout(5):
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.BINARY:
                log.append(("audio", msg.data))
            elif msg.type is WSMsgType.TEXT:
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    data = msg.data
                log.append(("text", data))
                if isinstance(data, dict) and done(data):
                    return log
            else:
                log.append(("closed", msg.type))
                return log


def texts(log: list[Any]) -> list[dict[str, Any]]:
    return [d for kind, d in log if kind == "text" and isinstance(d, dict)]


def assistant_stopped(m: dict[str, Any]) -> bool:
    return m.get("type") == "speech-update" and m.get("role") == "assistant" \
        and m.get("status") == "stopped"


# --- POST /call ---


async def test_call_needs_the_bearer_key(vapi: VapiStandin, http: aiohttp.ClientSession) -> None:
    for headers in ({}, auth("wrong"), {"Authorization": KEY}):
        async with http.post(f"{vapi.base_url}/call", json=GOOD_CALL, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["statusCode"] == 401
    assert not vapi.calls and [r.status for r in vapi.requests] == [401, 401, 401]


@pytest.mark.parametrize("body", [
    [1, 2],
    {k: v for k, v in GOOD_CALL.items() if k != "assistantId"},
    {**GOOD_CALL, "transport": {"provider": "daily"}},
    {**GOOD_CALL, "phoneNumberId": "pn-1"},
    {**GOOD_CALL, "metadata": "not an object"},
    {**GOOD_CALL, "transport": {"provider": "vapi.websocket",
                                "audioFormat": {"format": "opus"}}},
    {**GOOD_CALL, "transport": {"provider": "vapi.websocket",
                                "audioFormat": {"format": "pcm_s16le", "sampleRate": "16k"}}},
])
async def test_call_body_is_validated(vapi: VapiStandin, http: aiohttp.ClientSession,
                                      body: Any) -> None:
    async with http.post(f"{vapi.base_url}/call", json=body, headers=auth()) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert answer["error"] == "Bad Request" and answer["message"]
    assert not vapi.calls


async def test_call_answer_points_at_the_standins_own_socket(vapi: VapiStandin,
                                                             http: aiohttp.ClientSession) -> None:
    call = await create_call(http, vapi)
    assert call["type"] == "vapi.websocketCall" and call["status"] == "queued"
    assert call["assistantId"] == "asst-1" and call["metadata"] == {"engineSessionId": "s-1"}
    url = call["transport"]["websocketCallUrl"]
    assert url == f"ws://127.0.0.1:{vapi.port}/{call['id']}/transport"
    assert vapi.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert vapi.requests[0].json() == GOOD_CALL


# --- the call socket ---


async def test_a_caller_turn_gets_transcripts_and_a_streamed_reply(
        vapi: VapiStandin, http: aiohttp.ClientSession) -> None:
    call = await create_call(http, vapi)
    async with http.ws_connect(call["transport"]["websocketCallUrl"]) as ws:
        await send_turn(ws)
        log = await read_until(ws, assistant_stopped, [])
    rec = vapi.calls[call["id"]]
    sent = b"".join(frames(speech_like(600, seed=3)) + frames(room_noise(700)))
    assert bytes(rec.audio_in) == sent
    kinds = [(m["type"], m.get("role"), m.get("status") or m.get("transcriptType"))
             for m in texts(log)]
    assert kinds == [
        ("status-update", None, "in-progress"),
        ("speech-update", "user", "started"),
        ("transcript", "user", "partial"),
        ("speech-update", "user", "stopped"),
        ("transcript", "user", "final"),
        ("speech-update", "assistant", "started"),
        ("transcript", "assistant", "final"),
        ("speech-update", "assistant", "stopped"),
    ]
    assert texts(log)[4]["transcript"] == vapi.control.transcript_text
    started = next(i for i, (k, d) in enumerate(log) if k == "text" and isinstance(d, dict)
                   and d.get("role") == "assistant" and d.get("status") == "started")
    audio = [(i, d) for i, (k, d) in enumerate(log) if k == "audio"]
    assert audio and all(i > started for i, _ in audio)
    assert b"".join(d for _, d in audio) == rec.replies[0].pcm
    assert len(rec.replies[0].pcm) == 16000 * 2 * 1500 // 1000
    assert all(len(d) == 640 for _, d in audio)


@pytest.mark.parametrize("stale", [False, True])
async def test_caller_speech_during_playout_interrupts_the_reply(
        vapi: VapiStandin, http: aiohttp.ClientSession, stale: bool) -> None:
    vapi.control.stale_audio = stale
    call = await create_call(http, vapi)
    async with http.ws_connect(call["transport"]["websocketCallUrl"]) as ws:
        await send_turn(ws)
        async with asyncio.timeout(5):
            while (await ws.receive()).type is not WSMsgType.BINARY:
                pass  # until the reply starts playing
        await send_turn(ws, speech_ms=300, quiet_ms=100, seed=1)
        log = await read_until(ws, assistant_stopped, [])
    rec = vapi.calls[call["id"]]
    reply = rec.replies[0]
    assert reply.interrupted and not reply.completed
    cut = next(i for i, (k, d) in enumerate(log) if k == "text" and isinstance(d, dict)
               and d.get("type") == "user-interrupted")
    after = b"".join(d for k, d in log[cut:] if k == "audio")
    assert len(after) == reply.stale_bytes
    assert (reply.stale_bytes > 0) is stale


async def test_end_call_and_hangup_both_end_the_call(vapi: VapiStandin,
                                                     http: aiohttp.ClientSession) -> None:
    for kind in ("end-call", "hangup"):
        call = await create_call(http, vapi)
        async with http.ws_connect(call["transport"]["websocketCallUrl"]) as ws:
            await ws.send_str(json.dumps({"type": kind}))
            log = await read_until(ws, lambda m: m.get("status") == "ended", [])
            closing = await ws.receive()
        assert texts(log)[-1] == {"type": "status-update", "status": "ended",
                                  "endedReason": "customer-ended-call"}
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
        rec = vapi.calls[call["id"]]
        assert rec.ended and rec.control_messages(kind) == [{"type": kind}]


async def test_an_ended_call_cannot_be_rejoined(vapi: VapiStandin,
                                                http: aiohttp.ClientSession) -> None:
    call = await create_call(http, vapi)
    url = call["transport"]["websocketCallUrl"]
    async with http.ws_connect(url) as ws:
        await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        async with http.ws_connect(url):
            pass
    assert caught.value.status == 404
    assert vapi.calls[call["id"]].ended_reason == "customer-ended-call"


async def test_say_add_message_control_and_transfer_are_recorded_and_honoured(
        vapi: VapiStandin, http: aiohttp.ClientSession) -> None:
    call = await create_call(http, vapi)
    sent = [
        {"type": "add-message", "message": {"role": "system", "content": "be brief"},
         "triggerResponseEnabled": False},
        {"type": "control", "control": "mute-assistant"},
        {"type": "control", "control": "unmute-assistant"},
        {"type": "say", "content": "One moment please.", "endCallAfterSpoken": False},
        {"type": "transfer", "destination": {"type": "number", "number": "+15550199"}},
    ]
    async with http.ws_connect(call["transport"]["websocketCallUrl"]) as ws:
        for message in sent:
            await ws.send_str(json.dumps(message))
        log = await read_until(ws, lambda m: m.get("type") == "transfer-update", [])
        log = await read_until(ws, assistant_stopped, log)
    rec = vapi.calls[call["id"]]
    assert rec.control_messages() == sent
    assert [r.text for r in rec.replies] == ["One moment please."]  # add-message did not answer
    assert {"type": "transcript", "role": "assistant", "transcriptType": "final",
            "transcript": "One moment please."} in texts(log)
    assert {"type": "transfer-update",
            "destination": {"type": "number", "number": "+15550199"}} in texts(log)
    assert sum(len(d) for k, d in log if k == "audio") == len(rec.replies[0].pcm)


async def test_say_with_end_call_after_spoken_ends_the_call(
        vapi: VapiStandin, http: aiohttp.ClientSession) -> None:
    call = await create_call(http, vapi)
    async with http.ws_connect(call["transport"]["websocketCallUrl"]) as ws:
        await ws.send_str(json.dumps({"type": "say", "content": "Goodbye.",
                                      "endCallAfterSpoken": True}))
        log = await read_until(ws, lambda m: m.get("status") == "ended", [])
    assert texts(log)[-1]["endedReason"] == "assistant-said-end-call-phrase"
    assert vapi.calls[call["id"]].replies[0].completed


async def test_malformed_frames_fault(vapi: VapiStandin, http: aiohttp.ClientSession) -> None:
    vapi.control.malformed_frames = True
    call = await create_call(http, vapi)
    async with http.ws_connect(call["transport"]["websocketCallUrl"]) as ws:
        received = [(await ws.receive()).data for _ in range(1 + len(MALFORMED_FRAMES))]
    assert received[1:] == list(MALFORMED_FRAMES)


async def test_drop_fault_aborts_the_socket_without_a_close_frame(
        vapi: VapiStandin, http: aiohttp.ClientSession) -> None:
    vapi.control.drop_after_ms = 50
    call = await create_call(http, vapi)
    async with http.ws_connect(call["transport"]["websocketCallUrl"]) as ws:
        await ws.receive()  # status-update in-progress
        async with asyncio.timeout(5):
            msg = await ws.receive()
    assert msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR)
    assert ws.close_code != 1000
    assert vapi.calls[call["id"]].dropped


async def test_pushed_messages_and_an_assistant_hangup(vapi: VapiStandin,
                                                       http: aiohttp.ClientSession) -> None:
    call = await create_call(http, vapi)
    async with http.ws_connect(call["transport"]["websocketCallUrl"]) as ws:
        await ws.receive()
        await vapi.push(call["id"], {"type": "hang"})
        assert json.loads((await ws.receive()).data) == {"type": "hang"}
        await vapi.end_call(call["id"], "assistant-ended-call")
        log = await read_until(ws, lambda m: m.get("status") == "ended", [])
    assert texts(log)[-1]["endedReason"] == "assistant-ended-call"


# --- REST faults ---


async def test_429_with_retry_after_for_the_next_requests_then_success(
        vapi: VapiStandin, http: aiohttp.ClientSession) -> None:
    vapi.control.fail_429, vapi.control.retry_after = 2, "7"
    answers = []
    for _ in range(3):
        async with http.post(f"{vapi.base_url}/call", json=GOOD_CALL, headers=auth()) as resp:
            answers.append((resp.status, resp.headers.get("Retry-After")))
    assert answers == [(429, "7"), (429, "7"), (201, None)]
    assert len(vapi.calls) == 1


async def test_500_malformed_json_and_slow_answers(vapi: VapiStandin,
                                                   http: aiohttp.ClientSession) -> None:
    vapi.control.fail_500 = 1
    async with http.post(f"{vapi.base_url}/call", json=GOOD_CALL, headers=auth()) as resp:
        assert resp.status == 500
    vapi.control.malformed_json = 1
    async with http.post(f"{vapi.base_url}/call", json=GOOD_CALL, headers=auth()) as resp:
        assert resp.status == 201
        with pytest.raises(ValueError):
            json.loads(await resp.read())
    vapi.control.delay_s = 0.5
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(f"{vapi.base_url}/call", json=GOOD_CALL, headers=auth(),
                             timeout=aiohttp.ClientTimeout(total=0.1)):
            pass


async def test_control_route_sets_faults_and_recorded_route_lists_requests(
        vapi: VapiStandin, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{vapi.base_url}/_control", json={"fail_500": 1}) as resp:
        assert resp.status == 200 and (await resp.json())["fail_500"] == 1
    async with http.post(f"{vapi.base_url}/_control", json={"no_such_fault": 1}) as resp:
        assert resp.status == 400
    async with http.post(f"{vapi.base_url}/call", json=GOOD_CALL, headers=auth()) as resp:
        assert resp.status == 500
    async with http.get(f"{vapi.base_url}/_recorded") as resp:
        recorded = await resp.json()
    assert [(r["path"], r["status"]) for r in recorded["requests"]] == [("/call", 500)]


# --- POST /chat ---


async def test_chat_threads_previous_chat_id(vapi: VapiStandin,
                                             http: aiohttp.ClientSession) -> None:
    url = f"{vapi.base_url}/chat"
    async with http.post(url, json={"assistantId": "a", "input": "Hi"}, headers=auth()) as resp:
        assert resp.status == 201
        first = await resp.json()
    assert first["output"] == [{"role": "assistant",
                                "content": "You said: Hi (message 1 of this conversation)"}]
    assert first["messages"] == [{"role": "user", "content": "Hi"}]
    follow = {"assistantId": "a", "input": [{"role": "user", "content": "Hours?"}],
              "previousChatId": first["id"]}
    async with http.post(url, json=follow, headers=auth()) as resp:
        second = await resp.json()
    assert second["id"] != first["id"]
    assert second["output"][0]["content"] == "You said: Hours? (message 2 of this conversation)"


@pytest.mark.parametrize(("body", "status"), [
    ({"assistantId": "a"}, 400),
    ({"assistantId": "a", "input": "x", "previousChatId": "c", "sessionId": "s"}, 400),
    ({"input": "x"}, 400),
    ({"assistantId": "a", "input": "x", "previousChatId": "chat_missing"}, 404),
])
async def test_chat_rejects_what_vapi_rejects(vapi: VapiStandin, http: aiohttp.ClientSession,
                                              body: dict[str, Any], status: int) -> None:
    async with http.post(f"{vapi.base_url}/chat", json=body, headers=auth()) as resp:
        assert resp.status == status
    async with http.post(f"{vapi.base_url}/chat", json={"assistantId": "a", "input": "x"}) as resp:
        assert resp.status == 401


async def test_chat_stream_is_server_sent_deltas(vapi: VapiStandin,
                                                 http: aiohttp.ClientSession) -> None:
    body = {"assistantId": "a", "input": "What are your hours?", "stream": True}
    async with http.post(f"{vapi.base_url}/chat", json=body, headers=auth()) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    deltas = [json.loads(line[len("data: "):]) for line in raw.split("\n\n") if line]
    (chat,) = vapi.chats.values()
    assert len(deltas) > 3
    assert all(e.keys() == {"id", "path", "delta"} for e in deltas)
    assert all(e["path"] == "chat.output[0].content" and e["id"] == chat["id"] for e in deltas)
    assert "".join(e["delta"] for e in deltas) == chat["output"][0]["content"]


async def test_chat_stream_can_end_with_the_complete_chat(vapi: VapiStandin,
                                                          http: aiohttp.ClientSession) -> None:
    vapi.control.chat_final_event = True
    body = {"assistantId": "a", "input": "Hi", "stream": True}
    async with http.post(f"{vapi.base_url}/chat", json=body, headers=auth()) as resp:
        raw = (await resp.read()).decode()
    *deltas, final = [json.loads(line[len("data: "):]) for line in raw.split("\n\n") if line]
    assert vapi.chats[final["id"]] == final
    assert "".join(e["delta"] for e in deltas) == final["output"][0]["content"]


# --- server messages (webhooks) ---


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[tuple[str, list[tuple[bytes, dict[str, str]]]]]:
    """A plain HTTP endpoint that records the raw bytes and headers of each POST."""
    seen: list[tuple[bytes, dict[str, str]]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((await request.read(), dict(request.headers)))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/vapi/webhook", handle)
    async with serve_app(app) as base:
        yield f"{base}/vapi/webhook", seen


def verify(secret: str, scheme: str, body: bytes, headers: dict[str, str],
           max_age_s: float = 300.0) -> bool:
    """An independent check, written from the page, not from the helper."""
    if scheme == "bearer":
        return headers.get("Authorization") == f"Bearer {secret}"
    if scheme == "x-vapi-secret":
        return headers.get("X-Vapi-Secret") == secret
    signature = headers.get("x-signature")
    if signature is None:
        return False
    payload = body
    if scheme == "hmac-timestamp":
        ts = headers.get("x-timestamp")
        if ts is None or abs(time.time() * 1000 - int(ts)) > max_age_s * 1000:
            return False
        payload = ts.encode() + b"." + body
    expected = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


@pytest.mark.parametrize("scheme", ["bearer", "x-vapi-secret", "hmac", "hmac-timestamp"])
async def test_webhooks_are_signed_as_each_scheme_and_broken_on_purpose(
        http: aiohttp.ClientSession, scheme: Any) -> None:
    secret = "whsec-test"
    message = server_message("tool-calls", call_id="call-9", toolCallList=[
        {"id": "tc-1", "type": "function", "function": {"name": "hours", "arguments": {}}}])
    variants: list[Any] = ["valid", "bad", "missing"]
    variants += ["tampered"] if scheme.startswith("hmac") else []
    variants += ["stale"] if scheme == "hmac-timestamp" else []
    async with receiver() as (url, seen):
        for variant in variants:
            signed = sign_webhook(message, scheme=scheme, secret=secret, variant=variant)
            assert (await fire_webhook(http, url, signed))[0][0] == 200
        verdicts = {v: verify(secret, scheme, body, headers) for v, (body, headers)
                    in zip(variants, seen, strict=True)}
    assert verdicts == {v: v == "valid" for v in variants}
    body, _ = seen[0]
    assert json.loads(body)["message"]["call"]["id"] == "call-9"


async def test_hmac_can_be_base64_with_a_prefix_in_a_named_header() -> None:
    message = server_message("status-update", status="in-progress")
    signed = sign_webhook(message, scheme="hmac", secret="s", encoding="base64",
                          prefix="sha256=", signature_header="x-vapi-signature")
    digest = hmac.new(b"s", signed.body, hashlib.sha256).digest()
    assert signed.headers["x-vapi-signature"] == "sha256=" + base64.b64encode(digest).decode()
    assert "x-signature" not in signed.headers


async def test_a_stale_webhook_is_correctly_signed_but_old(http: aiohttp.ClientSession) -> None:
    signed = sign_webhook(server_message("status-update", status="ended"),
                          scheme="hmac-timestamp", secret="s", variant="stale")
    ts = int(signed.headers["x-timestamp"])
    assert time.time() * 1000 - ts >= 590_000
    assert verify("s", "hmac-timestamp", signed.body, signed.headers, max_age_s=3600)


async def test_a_replay_sends_the_same_bytes_twice(http: aiohttp.ClientSession) -> None:
    signed: SignedWebhook = sign_webhook(server_message("end-of-call-report"),
                                         scheme="hmac-timestamp", secret="s")
    async with receiver() as (url, seen):
        answers = await fire_webhook(http, url, signed, times=2)
    assert [a for a, _ in answers] == [200, 200]
    assert seen[0][0] == seen[1][0] == signed.body
    assert seen[0][1]["x-signature"] == seen[1][1]["x-signature"]
    assert verify("s", "hmac-timestamp", *seen[1])


# --- as a program ---


async def test_runs_as_a_module_with_port_and_key() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.vapi_standin", "--port", str(port), "--api-key", "cli-key",
        cwd=root, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            line = (await proc.stdout.readline()).decode()
        assert f"127.0.0.1:{port}" in line
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/call", json=GOOD_CALL,
                                 headers=auth("cli-key")) as resp:
                assert resp.status == 201
    finally:
        proc.terminate()
        await proc.wait()
    assert proc.returncode == 0
