"""Agent → server (PROTOCOL.md "Agent → server" and "Websocket transport for pings").

Pings go over one websocket (``/api/agent/v1/ws``, ``Authorization: Bearer <host
token>`` on the upgrade); when the socket cannot be had they are POSTed instead. What
went wrong is told by the exception raised: :class:`Unreachable` (no answer, or a
server error: back off and retry), :class:`TokenRejected` (401: connect again),
:class:`ReportRejected` (the server refused the report itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp

from . import AGENT_NAME, __version__

log = logging.getLogger("hadash_agent")

API = "/api/agent/v1"
REQUEST_TIMEOUT = 15.0  # seconds for any one request to the server
WS_RETRY = 60.0  # after the server refused a websocket, report over HTTP this long


class Unreachable(Exception):
    pass


class TokenRejected(Exception):
    pass


class ReportRejected(Exception):
    pass


def error_text(data: Any, status: int) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return f"HTTP {status}"


def ws_url(server_url: str) -> str:
    if server_url.startswith("https://"):
        return "wss://" + server_url[len("https://"):] + API + "/ws"
    return "ws://" + server_url[len("http://"):] + API + "/ws"


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {REQUEST_TIMEOUT:.0f} s"
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error is not None:
        return exc.os_error.strerror or str(exc.os_error)
    return str(exc) or type(exc).__name__


class ServerLink:
    def __init__(self, server_url: str):
        self.server_url = server_url
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self.ws_retry_at = 0.0
        self.transport = "none"

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            headers={"User-Agent": f"{AGENT_NAME}/{__version__}"},
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            trust_env=False,  # agents talk to the management network directly
        )

    async def close(self) -> None:
        await self.drop_ws()
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def drop_ws(self) -> None:
        ws, self.ws = self.ws, None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
        if ws is not None and not ws.closed:
            try:
                await asyncio.wait_for(ws.close(), 2)
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass

    # --- plain requests ---------------------------------------------------------------
    async def post(self, path: str, body: dict, bearer: str) -> tuple[int, Any]:
        """POST ``body`` to the server; (status, decoded JSON or None). Unreachable when
        no answer comes."""
        assert self.session is not None
        try:
            async with self.session.post(
                self.server_url + API + path, json=body,
                headers={"Authorization": f"Bearer {bearer}"},
            ) as response:
                try:
                    data = await response.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    data = None
                return response.status, data
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Unreachable(describe(exc)) from None

    async def disconnect(self, token: str, reason: str) -> None:
        await self.post("/disconnect", {"reason": reason}, token)

    # --- pings -------------------------------------------------------------------------
    async def ping(self, vms: list[dict], token: str) -> float | None:
        """Send one power report; the server's ping_interval (None if it named none)."""
        if self.ws is None and time.monotonic() >= self.ws_retry_at:
            await self._open_ws(token)
        if self.ws is not None:
            answer = await self._ws_ping(vms)
            if answer is not None:
                self.transport = "websocket"
                return answer
        return await self._http_ping(vms, token)

    async def _open_ws(self, token: str) -> None:
        assert self.session is not None
        try:
            ws = await asyncio.wait_for(self.session.ws_connect(
                ws_url(self.server_url), headers={"Authorization": f"Bearer {token}"},
                autoping=True, max_msg_size=1024 * 1024,
            ), REQUEST_TIMEOUT)
        except aiohttp.WSServerHandshakeError as exc:
            # The upgrade was refused: a wrong token (HTTP tells us) or no websocket
            # transport on this server.
            log.info("server refused the websocket (HTTP %s): reporting over HTTP", exc.status)
            self.ws_retry_at = time.monotonic() + WS_RETRY
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.debug("websocket not available: %s", describe(exc))
        else:
            self.ws, self._inbox = ws, asyncio.Queue()
            self._reader = asyncio.create_task(self._read(ws, self._inbox))

    @staticmethod
    async def _read(ws: aiohttp.ClientWebSocketResponse, inbox: asyncio.Queue) -> None:
        """Read the socket all the time, not only while waiting for a pong, so the
        server's keep-alive pings are answered between reports (daphne closes a socket
        that does not answer them) and a closed socket is noticed at once. Text
        messages go to ``inbox``; None there means the socket is closed."""
        try:
            async for message in ws:  # answers pings itself (autoping)
                if message.type == aiohttp.WSMsgType.TEXT:
                    inbox.put_nowait(message.data)
                elif message.type == aiohttp.WSMsgType.ERROR:
                    break
        except (aiohttp.ClientError, OSError, RuntimeError):
            pass
        finally:
            inbox.put_nowait(None)

    async def _ws_ping(self, vms: list[dict]) -> float | None:
        """The interval from the pong, or None: the socket failed or the server said
        ``error`` (then the same report goes over HTTP, whose status says why)."""
        ws, inbox = self.ws, self._inbox
        assert ws is not None
        try:
            if ws.closed or self._reader is None or self._reader.done():
                raise ConnectionResetError("closed")
            await ws.send_str(json.dumps({"type": "ping", "vms": vms}))
            while True:
                text = await asyncio.wait_for(inbox.get(), REQUEST_TIMEOUT)
                if text is None:
                    raise ConnectionResetError(f"closed by the server, code {ws.close_code}")
                data = json.loads(text)
                if isinstance(data, dict) and data.get("type") == "pong":
                    interval = data.get("ping_interval")
                    return interval if isinstance(interval, (int, float)) else 0.0
                if isinstance(data, dict) and data.get("type") == "error":
                    log.debug("websocket: server answered error: %s", data.get("error"))
                    break
                # anything else (an extension message): keep waiting for the pong
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, RuntimeError) as exc:
            log.info("websocket lost (%s); reporting over HTTP", describe(exc))
        await self.drop_ws()
        return None

    async def _http_ping(self, vms: list[dict], token: str) -> float | None:
        status, data = await self.post("/ping", {"vms": vms}, token)
        if status == 200:
            self.transport = "http"
            interval = data.get("ping_interval") if isinstance(data, dict) else None
            return interval if isinstance(interval, (int, float)) else 0.0
        if status in (401, 403):
            raise TokenRejected(error_text(data, status))
        if 400 <= status < 500:
            raise ReportRejected(f"HTTP {status}: {error_text(data, status)}")
        raise Unreachable(f"server error HTTP {status}: {error_text(data, status)}")
