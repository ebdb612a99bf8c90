"""What the viewer's server checks before it answers a request: Host, Origin and, off loopback, a token.

Listening on 127.0.0.1 keeps other machines out, but not web pages: any site open in the user's
browser can send requests to 127.0.0.1. The checks follow Jupyter's:

- Host (DNS rebinding): a page on ``evil.example`` whose name is re-pointed at 127.0.0.1 can read
  the answers, but its requests say ``Host: evil.example``. Only the names the server was bound to
  are answered (and, on a wildcard address, this machine's name and IP literals).
- Origin (cross-site request forgery): any page can make the browser POST a form or a simple
  fetch to the viewer without reading the answer. State-changing requests must come from the
  viewer's own page: their Origin (or Referer, without Origin) must be the Host they were sent to.
  Requests with neither header do not come from a web page (curl, scripts) and pass.
- Token: off loopback, anyone on the network can connect. Every request must then carry the random
  token printed at start: in the URL (``?token=``) once, which sets an HttpOnly SameSite=Strict
  cookie the page's own requests then carry, or in an ``Authorization: token ...`` header.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import MutableMapping, Optional, Protocol
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
"""Host names that always reach this machine's loopback interface."""

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
"""Bind addresses that listen on every interface."""

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
"""Methods that must come from the viewer's own page (a cross-site page cannot be trusted with them)."""

TOKEN_PARAM = "token"
"""Query parameter that carries the token (in the URL printed at start)."""


class Headers(Protocol):
    """A request's headers (``http.client.HTTPMessage`` or a dict): only ``get`` is used."""

    def get(self, name: str, default: None = None) -> Optional[str]: ...


def _bare(host: str) -> str:
    """A host name or address without IPv6 brackets, lower case."""
    return host.strip().strip("[]").lower()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, brackets allowed) is reachable only from this machine."""
    name = _bare(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> Optional[str]:
    """The name in a Host header (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``), lower case.

    Returns None for a malformed header (an unbracketed IPv6 address, a non-numeric port).
    """
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        name, rest = header[1:end], header[end + 1:]
    else:
        name, colon, port = header.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    return name or None


def _same_origin(origin: str, host_header: str) -> bool:
    """Whether ``origin`` (an Origin or Referer value) is ``http://`` + the Host the request went to."""
    try:
        seen, expected = urlsplit(origin), urlsplit("http://" + host_header.strip())
        return (seen.scheme == "http" and seen.hostname is not None and seen.hostname == expected.hostname
                and (seen.port or 80) == (expected.port or 80))
    except ValueError:  # a malformed port or address
        return False


def exposure_warning(host: str, port: int, token: Optional[str]) -> Optional[str]:
    """What to tell the user when the viewer listens beyond this machine; None on loopback.

    It says where the server really listens, the URL other machines use, and what the server
    does not protect (the network sees everything: there is no TLS).
    """
    if is_loopback(host):
        return None
    wildcard = _bare(host) in WILDCARD_HOSTS
    where = f"all interfaces ({host or '0.0.0.0'})" if wildcard else host
    name = socket.gethostname() if wildcard else _bare(host)
    remote = f"http://{f'[{name}]' if ':' in name else name}:{port}/" + (f"?{TOKEN_PARAM}={token}" if token else "")
    access = "needs the token in" if token else "has NO token check (token disabled); it is at"
    return (f"The viewer listens on {where}, port {port}: anyone who can reach this machine over the network can "
            f"connect. It {access} {remote}. There is no TLS: the token, frames and uploads cross the network "
            f"unencrypted. Do not expose it to the internet; use --host 127.0.0.1 for this machine only.")


@dataclass(frozen=True)
class Verdict:
    """The guard's answer for one request."""

    refusal: Optional[str] = None
    """Why the request is answered 403 Forbidden; None: serve it."""
    set_cookie: Optional[str] = None
    """A ``Set-Cookie`` value to send with the answer (the token arrived in the URL)."""


class RequestGuard:
    """The Host, token and Origin checks of one server (see the module's docstring).

    Args:
        bound_host: the address or name the server listens on.
        port: its port (the token cookie is named after it: cookies do not tell ports apart).
        token: required on every request; None: no token (loopback).
    """

    def __init__(self, bound_host: str, port: int, token: Optional[str]):
        bound = _bare(bound_host)
        self.token = token
        self.cookie_name = f"avatar-viewer-token-{port}"
        self._wildcard = bound in WILDCARD_HOSTS
        names = set(LOOPBACK_NAMES)
        if self._wildcard:
            machine = socket.gethostname().lower()
            names |= {machine, machine.split(".")[0]}
        else:
            names.add(bound)
        self._names = frozenset(names)

    def host_allowed(self, header: Optional[str]) -> bool:
        """Whether a request's Host header names this server (any port)."""
        name = host_name(header or "")
        if name is None:
            return False
        return name in self._names or (self._wildcard and _is_ip(name))

    def _presented(self, headers: Headers) -> Optional[str]:
        """The token a request carries besides the query: ``Authorization: token ...``, then the cookie."""
        scheme, _, value = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
        cookies: SimpleCookie = SimpleCookie()
        try:
            cookies.load(headers.get("Cookie") or "")
        except CookieError:
            return None
        morsel = cookies.get(self.cookie_name)
        return morsel.value if morsel is not None else None

    def _token_ok(self, presented: Optional[str]) -> bool:
        assert self.token is not None
        return presented is not None and secrets.compare_digest(presented.encode(), self.token.encode())

    def check(self, method: str, headers: Headers, query: MutableMapping[str, str]) -> Verdict:
        """Whether to serve a request; removes the token from ``query`` (it is not a view setting)."""
        host = headers.get("Host")
        if not self.host_allowed(host):
            return Verdict(f"this viewer does not answer requests for host {host!r}; open it by the address it "
                           f"prints (a page of another site may be trying to reach it)")
        from_query = query.pop(TOKEN_PARAM, None)
        set_cookie = None
        if self.token is not None:
            presented = from_query if from_query is not None else self._presented(headers)
            if not self._token_ok(presented):
                return Verdict("this viewer needs its token: open the URL with ?token=... that `avatar view` printed")
            if from_query is not None:
                set_cookie = f"{self.cookie_name}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        if method in STATE_CHANGING:
            origin, source = headers.get("Origin"), "Origin"
            if origin is None:
                origin, source = headers.get("Referer"), "Referer"
            if origin is not None and not _same_origin(origin, host or ""):
                return Verdict(f"{method} from another site refused ({source} {origin!r} is not this viewer's page)")
        return Verdict(None, set_cookie)


def new_token() -> str:
    """A fresh random token (URL-safe, 192 bits)."""
    return secrets.token_urlsafe(24)
