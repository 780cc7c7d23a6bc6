"""Twilio's REST API, for what is done to a live call: redirecting it to a person.

`POST {api}/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` with `Twiml=<Response><Dial>…`
and HTTP Basic auth (AccountSid:AuthToken). The stream stops and the call runs the new TwiML.
"""
from __future__ import annotations

import base64
from typing import Any
from xml.sax.saxutils import escape

import aiohttp

from engine.log import get_logger

log = get_logger("twilio.rest")


def dial_twiml(number: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Dial>{escape(number)}</Dial></Response>"
    )


async def redirect_call(
    engine: Any, account_sid: str, call_sid: str, number: str, session_id: str
) -> bool:
    """Points the live call at `<Dial>number</Dial>`; True when Twilio accepted."""
    from engine.retry import RetryError, request_with_retry

    settings = engine.settings
    token = settings.twilio_auth_token
    sid = settings.twilio_account_sid or account_sid
    if not token:
        log.warning("transfer.no_credentials", session=session_id)
        return False
    url = f"{settings.twilio_api_base}/2010-04-01/Accounts/{sid}/Calls/{call_sid}.json"

    def counted(*_: object) -> None:
        engine.metrics.backend_retries += 1

    credentials = base64.b64encode(f"{sid}:{token}".encode()).decode()
    async with aiohttp.ClientSession() as http:
        try:
            result = await request_with_retry(
                http, "POST", url, data={"Twiml": dial_twiml(number)}, on_retry=counted,
                attempts=3, total_timeout=10.0, headers={"Authorization": f"Basic {credentials}"},
            )
        except RetryError as exc:
            log.error("transfer.failed", session=session_id, error=str(exc))
            return False
    ok = 200 <= result.status < 300
    log.info("transfer.redirect", session=session_id, status=result.status, ok=ok)
    return ok
