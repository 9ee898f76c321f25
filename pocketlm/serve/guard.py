"""Who may use the server: the Host and Origin checks and the API key, before any route runs.

A web page the user visits elsewhere can send requests to 127.0.0.1 (a text/plain POST needs no CORS
preflight), and a name that resolves to 127.0.0.1 (DNS rebinding) makes the browser treat the server as that
page's own. As Ollama does: a request whose Host is not a loopback name, the bind address or an --allow-host
is refused (403), and so is one whose Origin is neither the server's own page nor an --allow-origin; only an
allowed other origin gets CORS headers. With --api-key every route but the chat page (and its assets) and a
minimal /health wants the key. A plain ASGI middleware: nothing is read from the body, streams pass as they are.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import json
import socket
from urllib.parse import urlsplit

from pocketlm.serve.config import ServerConfig

OPEN_PATHS = ("/", "/health")  # the page itself and the health probe (which lists nothing without the key)
OPEN_PREFIXES = ("/static/",)  # the page's assets
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
CORS_METHODS = "GET, POST, DELETE, OPTIONS"  # DELETE: Ollama's /api/delete
CORS_HEADERS = "Authorization, Content-Type"


def host_name(host: str) -> str:
    """"127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1", "Example.COM." -> "example.com"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def ip_of(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class Guard:
    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config
        bind = ip_of(config.host)
        self.any_interface = bind is not None and bind.is_unspecified  # 0.0.0.0 or ::
        self.hosts = {host_name(config.host), *(host_name(h) for h in config.allow_hosts)}
        if self.any_interface:
            self.hosts.add(socket.gethostname().lower())

    # --------------------------------------------------------------------------------------- checks

    def host_allowed(self, host: str) -> bool:
        """Host: a loopback name or address, the bind address, an --allow-host ("*": any). Bound to every
        interface, any IP address too: a browser sends an address as Host only for a page of that address,
        which a rebinding attack cannot be (it needs a name)."""
        name = host_name(host)
        if not name or "*" in self.config.allow_hosts or name in self.hosts:
            return True
        if name in LOOPBACK_NAMES or name.endswith(".localhost"):
            return True
        ip = ip_of(name)
        return ip is not None and (ip.is_loopback or self.any_interface)

    def origin_allowed(self, origin: str, host: str) -> tuple[bool, bool]:
        """-> (allowed, cross-origin): the server's own page (same scheme-less host and port as Host), or an
        --allow-origin pattern (fnmatch: "http://localhost:*", "*")."""
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc and parts.netloc.lower() == host.strip().lower():
            return True, False
        return any(fnmatch.fnmatchcase(origin.lower(), pattern.lower()) for pattern in self.config.allow_origins), True

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        if not self.config.api_key:
            return True
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.config.api_key}".encode())

    # ---------------------------------------------------------------------------------------- ASGI

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1") if b"origin" in headers else None
        if not self.host_allowed(host):
            return await refuse(send, 403, f"Host '{host}' is not allowed: this server answers to its own address and "
                                           f"loopback names (start it with --allow-host NAME to add one)", "host_not_allowed")
        cross = False
        if origin is not None:
            allowed, cross = self.origin_allowed(origin, host)
            if not allowed:
                return await refuse(send, 403, f"Origin '{origin}' is not allowed: a web page of another site may not use "
                                               f"this server (start it with --allow-origin {origin} to let it)", "origin_not_allowed")
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")] if cross else []
        if cross and scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:  # a preflight
            return await send_plain(send, 204, cors + [
                (b"access-control-allow-methods", CORS_METHODS.encode()), (b"access-control-allow-headers", CORS_HEADERS.encode()),
                (b"access-control-max-age", b"600")])
        path = scope["path"]
        authorized = self.authorized(headers)
        scope.setdefault("state", {})["authorized"] = authorized
        if not authorized and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            return await refuse(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key", cors)
        if not cors:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        return await self.app(scope, receive, send_with_cors)


async def send_plain(send, status: int, headers: list, body: bytes = b"") -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def refuse(send, status: int, message: str, code: str, headers: list = ()) -> None:
    """OpenAI's error shape; ensure_ascii: whatever the header held, the body is plain ASCII."""
    kind = "authentication_error" if status == 401 else "permission_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send_plain(send, status, [(b"content-type", b"application/json"), *headers], body)
