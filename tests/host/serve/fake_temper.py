"""A fake Temper API on loopback: answers bound-action POSTs as scripted, records them."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeTemper:
    """Answers POST /tdata/{Set}('{id}')/Temper.{Action} with the status scripted for the
    entity id (a list: one per call, the last repeats), recording every request."""

    def __init__(self, scripts: dict[str, list[tuple[int, dict[str, str]]]]) -> None:
        self.scripts = scripts
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                entity = self.path.split("('", 1)[1].split("')", 1)[0]
                with fake.lock:
                    seen = sum(1 for r in fake.requests if r["entity"] == entity)
                    fake.requests.append(
                        {
                            "path": self.path,
                            "entity": entity,
                            "headers": dict(self.headers.items()),
                            "body": body,
                        }
                    )
                script = fake.scripts.get(entity, [(200, {})])
                status, headers = script[min(seen, len(script) - 1)]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                payload = b"{}"
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog (5) refuses a burst of sends

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeTemper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def keys_sent(self) -> list[str]:
        with self.lock:
            return [r["headers"]["Idempotency-Key"] for r in self.requests]
