"""ASGI entry point: HTTP through Django (agent and API requests through
``hosts.agent.asgi.AgentGate`` and ``hadash.api.asgi.ApiGate`` first), websockets
through Channels.

Under daphne, requests that can be refused from their headers alone (a bad or oversized
Content-Length, no credentials) are answered before a byte of their body is read.

It also gives daphne a deadline for receiving a request (issue 8, part 4: a slow body
times out). daphne (Twisted) reads a request's headers and its whole body before it
calls the application, so no Django worker waits on a slow client — but Twisted only
drops a connection after 60 s without a byte, and a client that trickles a byte now and
then keeps its request (and its connection) forever. Daphne has no option for this
(``--http-timeout`` bounds the application's response, not the request). So every HTTP
request must arrive whole — request line, headers and body — within
``settings.HADASH_REQUEST_TIMEOUT`` seconds (default 30) of its first byte; otherwise the
client gets ``408`` with a JSON ``{"error": …}`` and the connection is closed. A
websocket's handshake is a request like any other; once upgraded, the socket is the
websocket protocol's and no deadline applies.
"""

import json
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from hadash.api.asgi import ApiGate  # noqa: E402
from hadash.routing import websocket_urlpatterns  # noqa: E402
from hosts.agent.asgi import AgentGate, agent_handler  # noqa: E402


def header_refusal(method: bytes, raw_path: bytes, raw_headers) -> tuple[int, str] | None:
    """(status, message) when a request must be refused from its request line and
    headers alone (hosts.agent.asgi and hadash.api.guard hold the rules), else None."""
    from hadash.api import guard
    from hosts.agent.asgi import early_refusal as agent_refusal

    path = raw_path.split(b"?", 1)[0].decode("latin-1")
    headers = [(name.decode("latin-1"), value.decode("latin-1"))
               for name, values in raw_headers for value in values]
    return (agent_refusal(path, headers, method=method.decode("latin-1"))
            or guard.early_refusal(path, headers, session_cookie=settings.SESSION_COOKIE_NAME))


def install_request_deadline(seconds: float) -> None:
    """Make daphne's HTTP connections answer 408 to a request not received whole within
    ``seconds`` of its first byte. Importing Twisted here installs no reactor."""
    from daphne import http_protocol
    from twisted.web import http

    generic = getattr(http, "_GenericHTTPChannelProtocol", None)
    if generic is None:  # a Twisted without it: keep daphne's own (test_security.py fails)
        import logging

        logging.getLogger("hadash").warning(
            "this Twisted has no _GenericHTTPChannelProtocol: no request deadline")
        return

    class DeadlineHTTPChannel(http.HTTPChannel):
        request_deadline = seconds
        _deadline = None  # the pending IDelayedCall, while a request is being received

        _refused = False  # answered from the headers alone: ignore whatever follows

        def dataReceived(self, data):
            if self._refused:
                return
            if self._deadline is None and data and not self._handlingRequest:
                self._deadline = self.callLater(self.request_deadline, self._too_slow)
            super().dataReceived(data)

        def allHeadersReceived(self):
            """Refuse from the request line and headers alone — bad or oversized
            Content-Length, no credentials — before a byte of the body is read
            (issue 8 part 4: agent protocol and operator API)."""
            refusal = header_refusal(self._command, self._path,
                                     self.requests[-1].requestHeaders.getAllRawHeaders())
            if refusal is None:
                return super().allHeadersReceived()
            self._refused = True
            self._stop_deadline()
            status, message = refusal
            self._answer_and_close(status, message)

        def allContentReceived(self):
            self._stop_deadline()
            super().allContentReceived()

        def connectionLost(self, reason):
            self._stop_deadline()
            super().connectionLost(reason)

        def _stop_deadline(self):
            if self._deadline is not None:
                if self._deadline.active():
                    self._deadline.cancel()
                self._deadline = None

        def _too_slow(self):
            self._deadline = None
            if self._handlingRequest or self.transport is None:
                return
            self._answer_and_close(408, f"the request did not arrive whole within "
                                        f"{self.request_deadline:g} s")

        def _answer_and_close(self, status: int, message: str):
            body = json.dumps({"error": message}).encode()
            reason = http.RESPONSES.get(status, b"Error")
            extra = (b'WWW-Authenticate: Bearer realm="hadash"\r\n' if status == 401 else b"")
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n%s"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status, reason, extra, len(body), body))
            self.loseConnection()

    def protocol(factory):
        return generic(DeadlineHTTPChannel())

    http_protocol.HTTPFactory.protocol = protocol


install_request_deadline(settings.HADASH_REQUEST_TIMEOUT)

application = ProtocolTypeRouter(
    {
        # Agent requests with bad credentials or an oversized body are refused from
        # their headers, before the body is read (issue 8, part 4).
        # Agent requests that pass go to a handler with only the middleware that sets
        # their headers (hosts.agent.asgi.agent_handler; issue 12).
        "http": AgentGate(ApiGate(django_asgi_app), agent_app=agent_handler()),
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
