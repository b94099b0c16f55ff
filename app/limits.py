"""Request limits: body size counted on the streamed bytes, and a per-key rate limit.

The size cap is enforced as the body arrives (not from ``Content-Length`` alone), so a
chunked upload or one that lies about its length is cut off at the cap with 413 and is
never buffered whole. The rate limit is a token bucket kept in Redis, shared by every API
process, refilled continuously at ``rate`` tokens/s up to ``burst``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio
from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodySizeLimit", "PayloadTooLargeError", "RateLimitExceededError", "RateLimiter"]


class PayloadTooLargeError(HTTPException):
    """The request body passed its cap (an HTTPException, so FastAPI answers 413 with it)."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(
            status_code=413,
            detail=f"request body exceeds the limit of {limit} bytes ({setting})",
        )


class BodySizeLimit:
    """ASGI middleware: 413 once more body bytes have arrived than ``limit_for(scope)``
    allows; it gives the limit and the setting that sets it, which the 413 names."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[Scope], tuple[int, str]]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": PayloadTooLargeError(limit, setting).detail}, 413)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(limit, setting)
            return message

        await self.app(scope, counting_receive, send)


class RateLimitExceededError(HTTPException):
    """429 with the seconds to wait in ``Retry-After``."""

    def __init__(self, retry_after_s: float) -> None:
        wait = max(1, math.ceil(retry_after_s))
        super().__init__(
            status_code=429,
            detail=f"rate limit exceeded; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )


# KEYS[1] = bucket; ARGV = rate (tokens/s), burst. Server time keeps API processes in step.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


@dataclass
class RateLimiter:
    """Token bucket per API key, in Redis under ``{prefix}ratelimit:{tenant}``."""

    client: redis.asyncio.Redis
    prefix: str
    rate_per_s: float
    burst: int

    def __post_init__(self) -> None:
        self._script = self.client.register_script(_TOKEN_BUCKET)

    async def check(self, tenant: str) -> None:
        """Take one token for ``tenant`` or raise :class:`RateLimitExceededError`."""
        wait = float(
            await self._script(
                keys=[f"{self.prefix}ratelimit:{tenant}"], args=[self.rate_per_s, self.burst]
            )
        )
        if wait > 0:
            raise RateLimitExceededError(wait)
