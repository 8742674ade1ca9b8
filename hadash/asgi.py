"""ASGI entry point: HTTP through Django (agent requests through
``hosts.agent.asgi.AgentGate`` first), websockets through Channels.

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

from hadash.routing import websocket_urlpatterns  # noqa: E402
from hosts.agent.asgi import AgentGate  # noqa: E402


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

        def dataReceived(self, data):
            if self._deadline is None and data and not self._handlingRequest:
                self._deadline = self.callLater(self.request_deadline, self._too_slow)
            super().dataReceived(data)

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
            body = json.dumps({"error": f"the request did not arrive whole within "
                                        f"{self.request_deadline:g} s"}).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            self.loseConnection()

    def protocol(factory):
        return generic(DeadlineHTTPChannel())

    http_protocol.HTTPFactory.protocol = protocol


install_request_deadline(settings.HADASH_REQUEST_TIMEOUT)

application = ProtocolTypeRouter(
    {
        # Agent requests with bad credentials or an oversized body are refused from
        # their headers, before the body is read (issue 8, part 4).
        "http": AgentGate(django_asgi_app),
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
