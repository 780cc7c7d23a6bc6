"""Settings: the environment, or a `.env` file in the working directory (CONTRACT.md)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; `#` comments, optional `export `, optional matching quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    backend: str = "auto"
    workers: int = 1
    vapi_api_key: str | None = None
    vapi_assistant_id: str | None = None
    vapi_base_url: str = "https://api.vapi.ai"
    vapi_webhook_secret: str | None = None
    insecure_webhooks: bool = False
    twilio_auth_token: str | None = None
    twilio_account_sid: str | None = None
    twilio_api_base: str = "https://api.twilio.com"
    transfer_number: str | None = None
    redis_url: str | None = None
    session_ttl_s: float = 1800.0
    assistant_file: str | None = None
    stun_servers: tuple[str, ...] = field(default_factory=tuple)
    max_event_loop_lag_ms: float = 250.0
    #: WebRTC receive path: "engine" (native jitter buffer, Opus PLC/FEC) or "aiortc" (stock, for
    #: measurements)
    webrtc_media: str = "engine"
    #: on SIGTERM, how long live calls may go on before they are ended
    shutdown_grace_s: float = 20.0
    #: how much audio the engine keeps queued in Twilio's playback buffer
    twilio_lead_ms: float = 80.0

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "vapi" if self.vapi_api_key else "local"

    def with_overrides(self, **changes: Any) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, dotenv: Path | None = None
    ) -> "Settings":
        merged = read_dotenv(dotenv if dotenv is not None else Path.cwd() / ".env")
        merged.update(os.environ if env is None else env)

        def get(*names: str) -> str | None:
            for name in names:
                value = merged.get(name)
                if value:
                    return value
            return None

        stun = get("STUN_SERVERS")
        return cls(
            host=get("HOST") or cls.host,
            port=int(get("PORT") or cls.port),
            public_url=(get("PUBLIC_URL") or "").rstrip("/") or None,
            vapi_api_key=get("VAPI_API_KEY"),
            vapi_assistant_id=get("VAPI_ASSISTANT_ID", "ASSISTANT_ID"),
            vapi_base_url=(get("VAPI_BASE_URL") or cls.vapi_base_url).rstrip("/"),
            vapi_webhook_secret=get("VAPI_WEBHOOK_SECRET"),
            twilio_auth_token=get("TWILIO_AUTH_TOKEN"),
            twilio_account_sid=get("TWILIO_ACCOUNT_SID"),
            twilio_api_base=(get("TWILIO_API_BASE") or cls.twilio_api_base).rstrip("/"),
            transfer_number=get("TRANSFER_NUMBER"),
            redis_url=get("REDIS_URL"),
            session_ttl_s=float(get("SESSION_TTL_S") or cls.session_ttl_s),
            assistant_file=get("ASSISTANT_FILE"),
            max_event_loop_lag_ms=float(get("MAX_EVENT_LOOP_LAG_MS") or cls.max_event_loop_lag_ms),
            webrtc_media=get("WEBRTC_MEDIA") or cls.webrtc_media,
            shutdown_grace_s=float(get("SHUTDOWN_GRACE_S") or cls.shutdown_grace_s),
            twilio_lead_ms=float(get("TWILIO_LEAD_MS") or cls.twilio_lead_ms),
            stun_servers=tuple(s.strip() for s in stun.split(",") if s.strip()) if stun else (),
        )
