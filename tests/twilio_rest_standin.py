"""A stand-in for the part of Twilio's REST API the engine uses: updating a live call.

`POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` with HTTP Basic auth
(AccountSid:AuthToken) and a form body carrying `Twiml` (or `Url`). Answers like Twilio: 200 with
the call resource as JSON; 401 with Twilio's error shape for bad credentials; 400 without TwiML;
and, as fault modes, 429 (with Retry-After) or 500 for the next N requests.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class CallUpdate:
    account_sid: str
    call_sid: str
    form: dict[str, str]
    status: int


@dataclass
class TwilioRestStandin:
    account_sid: str
    auth_token: str
    fail_429: int = 0
    fail_500: int = 0
    updates: list[CallUpdate] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    base_url: str = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{call}.json", self._update_call)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "TwilioRestStandin":
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    @staticmethod
    def _error(
        status: int, code: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        return web.json_response({"code": code, "message": message, "status": status,
                                  "more_info": f"https://www.twilio.com/docs/errors/{code}"},
                                 status=status, headers=headers)

    async def _update_call(self, request: web.Request) -> web.Response:
        account, call = request.match_info["account"], request.match_info["call"]
        form = {k: str(v) for k, v in (await request.post()).items()}

        def record(status: int) -> None:
            self.updates.append(CallUpdate(account, call, form, status))

        credentials = f"{self.account_sid}:{self.auth_token}".encode()
        expected = "Basic " + base64.b64encode(credentials).decode()
        if request.headers.get("Authorization") != expected or account != self.account_sid:
            record(401)
            return self._error(401, 20003, "Authenticate")
        if self.fail_429 > 0:
            self.fail_429 -= 1
            record(429)
            return self._error(429, 20429, "Too Many Requests", {"Retry-After": "0"})
        if self.fail_500 > 0:
            self.fail_500 -= 1
            record(500)
            return self._error(500, 20500, "Internal Server Error")
        if "Twiml" not in form and "Url" not in form:
            record(400)
            return self._error(400, 21218, "Twiml or Url is required")
        record(200)
        body: dict[str, Any] = {"sid": call, "account_sid": account, "status": "in-progress",
                                "uri": f"/2010-04-01/Accounts/{account}/Calls/{call}.json"}
        return web.json_response(body)
