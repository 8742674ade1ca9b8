"""Real receivers for the notification tests: an HTTP server (http.server in a thread)
that checks the HMAC signature as a receiver would, and an SMTP server (aiosmtpd in
its own thread). Both listen on free ports of 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Records every POST: headers, the raw body, the parsed JSON and whether the
    ``X-Hadash-Signature`` matched ``secret``. Answers ``status`` (a list is used up
    one answer per request, then the last one stays); with ``hold`` set, each request
    waits until ``release`` is set before answering (a hanging receiver)."""

    def __init__(self, secret: str = "", status=200, hold: bool = False):
        self.secret = secret
        self.statuses = list(status) if isinstance(status, (list, tuple)) else [status]
        self.requests: list[dict] = []
        self.got = threading.Event()  # set at each request's arrival
        self.release = threading.Event()
        self.hold = hold
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver._record(self.headers, body, self.path)
                if receiver.hold:
                    receiver.release.wait(60)
                code = receiver._status()
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def _status(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def _record(self, headers, body: bytes, path: str) -> None:
        signed = headers.get("X-Hadash-Signature", "")
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        with self.lock:
            self.requests.append({
                "path": path, "headers": dict(headers), "body": body,
                "json": json.loads(body), "signature_ok": hmac.compare_digest(signed, expected),
                "key": headers.get("Idempotency-Key"),
            })
        self.got.set()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    """An http URL nothing listens on (connection refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/hook"


class SmtpServer:
    """aiosmtpd on a free port; ``messages`` holds (envelope recipients, parsed mail)."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list[tuple[list[str], object]] = []
        self.got = threading.Event()
        server = self

        class Handler:
            async def handle_DATA(self, _server, _session, envelope):  # noqa: N802
                server.messages.append((list(envelope.rcpt_tos),
                                        message_from_bytes(envelope.original_content)))
                server.got.set()
                return "250 OK"

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()
