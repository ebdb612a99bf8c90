"""The viewer's web server: one static page and a small JSON/JPEG API, on the standard library.

API (all under ``/api``; ``session`` is any id the page picks, one per tab):

- ``GET /api/info``: run, size, fps, motion-condition names, speeches.
- ``GET /api/frame?session=S[&setting=value...]``: apply the settings (see
  :class:`avatar.viewer.state.ViewState`) to the tab's state and return its frame as
  ``image/jpeg``; the ``X-Frame-Info`` header holds the frame's JSON info (render time, frame
  index, motion conditions, audio code).
- ``GET /api/state?session=S`` / ``POST /api/state?session=S`` (JSON object of settings).
- ``GET /api/speech?id=ID``: the speech's audio as a wav, for the page's audio element.
- ``POST /api/speech?name=NAME`` (body: an audio or video file): add an uploaded speech.

The page plays the speech in an audio element and asks for the frame at the element's current
time, one request at a time: when rendering is slower than the frame rate, frames are skipped and
the lips never fall behind the sound.

Hostile input (see :mod:`avatar.viewer.security` for the Host, Origin and token checks): at most
``MAX_CONNECTIONS`` connections are served at once (more are answered 503 at once, without a
thread), idle connections are dropped after ``IDLE_TIMEOUT_S``, one upload is read and decoded at a
time, and every frame is rendered on one renderer thread. Rendering from each connection's own
thread made memory grow with the number of clients: each thread got its own malloc arena (and
OpenMP team) holding a render's worth of freed buffers.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import socket
import socketserver
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, urlsplit

from avatar.errors import AvatarError
from avatar.progress import Progress
from avatar.viewer.engine import Rendered, Speech, ViewerEngine
from avatar.viewer.security import (
    STATE_CHANGING,
    WILDCARD_HOSTS,
    RequestGuard,
    exposure_warning,
    is_loopback,
    new_token,
)
from avatar.viewer.state import ViewState

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 200 * 1024 * 1024
"""Largest upload body; read into memory, and only one upload is read at a time."""
MAX_CONNECTIONS = 32
"""Connections served at once (a thread each); more are answered 503 Service Unavailable at once."""
IDLE_TIMEOUT_S = 30.0
"""A connection that sends nothing for this long is closed (its slot and thread are freed)."""
MAX_SESSIONS = 64
"""Tabs whose state is kept; the least recently seen is forgotten first (it restarts from defaults)."""

_SESSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _Sessions:
    """Per-tab view states keyed by the page's session id, bounded and thread-safe."""

    def __init__(self, default: ViewState, limit: int = MAX_SESSIONS):
        self._default = default
        self._limit = limit
        self._states: OrderedDict[str, ViewState] = OrderedDict()
        self._lock = threading.Lock()

    def _touch(self, session: str) -> ViewState:
        """The session's state, marked most recently seen (callers hold the lock)."""
        state = self._states.get(session, self._default)
        self._states[session] = state
        self._states.move_to_end(session)
        while len(self._states) > self._limit:
            self._states.popitem(last=False)
        return state

    def get(self, session: str) -> ViewState:
        with self._lock:
            return self._touch(session)

    def update(self, session: str, values: dict[str, Any]) -> ViewState:
        """Apply settings atomically (a ValueError leaves the state unchanged)."""
        with self._lock:
            state = self._touch(session)
            if values:
                state = state.update(values)
                self._states[session] = state
            return state


class _ViewerHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server holding the engine, the sessions, the page and the request guard.

    A thread per connection, but at most ``MAX_CONNECTIONS`` of them; renders run on one renderer
    thread and uploads on one decoder thread, whatever the number of clients.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, token: Optional[str]):
        self.address_family = family
        self.engine: Optional[ViewerEngine] = None
        self.sessions: Optional[_Sessions] = None
        self.page = resources.files("avatar.viewer").joinpath("static", "index.html").read_bytes()
        self.token = token
        self.guard: Optional[RequestGuard] = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-viewer-render")
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-viewer-upload")
        self._upload_slot = threading.Lock()
        self._said_full = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (socket.getfqdn), which can stall for
        # seconds on machines without reverse DNS; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.guard = RequestGuard(str(host), int(port), self.token)

    def attach(self, engine: ViewerEngine) -> None:
        self.engine = engine
        self.sessions = _Sessions(ViewState(speech=engine.default_speech))

    # -- bounded connections -------------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on its own thread if a slot is free, else answer 503 and close it."""
        if not self._slots.acquire(blocking=False):
            if not self._said_full:  # once per busy spell: a flood of connections must not flood the log too
                log.warning("%d connections are open; turning new ones away until some close", MAX_CONNECTIONS)
                self._said_full = True
            _turn_away(request)
            self.shutdown_request(request)
            return
        self._said_full = False
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        self._renderer.shutdown(wait=False, cancel_futures=True)
        self._decoder.shutdown(wait=False, cancel_futures=True)

    # -- heavy work, off the connection threads ------------------------------------------------

    def render(self, state: ViewState) -> Rendered:
        """Render on the renderer thread (the engine serialises renders anyway; see the module docstring)."""
        assert self.engine is not None
        return self._renderer.submit(self.engine.render, state).result()

    def add_speech(self, read_body: Callable[[], bytes], name: str) -> Speech:
        """Read an upload's body and add it, one upload at a time (each may hold MAX_UPLOAD_BYTES in memory).

        Raises:
            _HTTPError: 503 while another upload is being read or decoded.
        """
        assert self.engine is not None
        if not self._upload_slot.acquire(blocking=False):
            raise _HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, "another upload is being decoded; try again when done")
        try:
            data = read_body()
            if not data:
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "the upload is empty")
            return self._decoder.submit(self.engine.add_speech_bytes, data, name).result()
        finally:
            self._upload_slot.release()


_BUSY = json.dumps({"error": "the viewer is serving as many connections as it takes; try again"}).encode()


def _turn_away(request: socket.socket) -> None:
    """Answer 503 on a connection without reading it or giving it a thread (best effort, never blocks)."""
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(_BUSY)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n").encode()
    try:
        request.setblocking(False)
        request.send(head + _BUSY)
    except OSError:
        pass


class _HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the engine; errors become a JSON ``{"error": ...}`` with a 4xx/5xx."""

    server: _ViewerHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S  # idle connections end instead of holding a thread and a slot
    server_version = "avatar-viewer"
    disable_nagle_algorithm = True  # headers and body are two writes: without this, +40 ms per frame

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        routes: dict[tuple[str, str], Callable[[dict[str, str]], None]] = {
            ("GET", "/"): self._page, ("GET", "/index.html"): self._page,
            ("GET", "/api/info"): self._info, ("GET", "/api/frame"): self._frame,
            ("GET", "/api/state"): self._get_state, ("POST", "/api/state"): self._post_state,
            ("GET", "/api/speech"): self._get_speech, ("POST", "/api/speech"): self._post_speech,
            ("GET", "/api/speeches"): self._speeches,
        }
        route = routes.get((method, url.path))
        self._set_cookie = None
        try:
            self._guard(method, url.path, query)
            if route is None:
                raise _HTTPError(HTTPStatus.NOT_FOUND, f"no {method} {url.path}")
            route(query)
        except _HTTPError as err:
            if method in STATE_CHANGING:  # its body may be unread: it must not be parsed as the next request
                self.close_connection = True
            self._json({"error": str(err)}, err.status)
        except (ValueError, AvatarError) as err:
            self._json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client %s went away", self.address_string())
        except Exception as err:  # a bug: keep serving the other tabs, say what happened
            log.exception("error handling %s %s", method, self.path)
            self._json({"error": f"internal error: {err}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    # -- helpers -------------------------------------------------------------------------------

    def _guard(self, method: str, path: str, query: dict[str, str]) -> None:
        """Refuse (403) what :class:`RequestGuard` refuses; note the token cookie to set, if any."""
        assert self.server.guard is not None
        verdict = self.server.guard.check(method, self.headers, query)
        if verdict.refusal is not None:
            log.warning("refused %s %s from %s: %s", method, path, self.client_address[0], verdict.refusal)
            raise _HTTPError(HTTPStatus.FORBIDDEN, verdict.refusal)
        self._set_cookie = verdict.set_cookie

    _set_cookie: Optional[str] = None

    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK,
              headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self._set_cookie is not None:
            self.send_header("Set-Cookie", self._set_cookie)
        if self.close_connection:
            self.send_header("Connection", "close")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        try:
            self._send(json.dumps(data).encode(), "application/json", status)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _HTTPError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
        if int(length) > limit:
            raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the upload is larger than {limit >> 20} MB")
        return self.rfile.read(int(length))

    def _session(self, query: dict[str, str]) -> str:
        session = query.pop("session", "")
        if not _SESSION_ID.match(session):
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "pass session=ID (letters, digits, '_', '-', '.'; up to 64)")
        return session

    @property
    def _engine(self) -> ViewerEngine:
        assert self.server.engine is not None, "requests are served only after the engine is attached"
        return self.server.engine

    # -- routes --------------------------------------------------------------------------------

    def _page(self, query: dict[str, str]) -> None:
        self._send(self.server.page, "text/html; charset=utf-8")

    def _info(self, query: dict[str, str]) -> None:
        self._json(self._engine.info())

    def _speeches(self, query: dict[str, str]) -> None:
        self._json(self._engine.speeches())

    def _frame(self, query: dict[str, str]) -> None:
        session = self._session(query)
        assert self.server.sessions is not None
        state = self.server.sessions.update(session, query)
        rendered = self.server.render(state)
        self._send(rendered.jpeg, "image/jpeg", headers={
            "X-Frame-Info": json.dumps(rendered.info, separators=(",", ":")),
            "X-Render-Ms": f"{rendered.info['render_ms']:.2f}",
        })

    def _get_state(self, query: dict[str, str]) -> None:
        session = self._session(query)
        assert self.server.sessions is not None
        self._json(self.server.sessions.get(session).to_dict())

    def _post_state(self, query: dict[str, str]) -> None:
        session = self._session(query)
        try:
            values = json.loads(self._body(1 << 16) or b"{}")
        except json.JSONDecodeError as err:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({err})") from None
        if not isinstance(values, dict):
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "send a JSON object of settings")
        assert self.server.sessions is not None
        self._json(self.server.sessions.update(session, values).to_dict())

    def _get_speech(self, query: dict[str, str]) -> None:
        speech = self._engine.speech(query.get("id", ""))
        self._send(speech.wav, "audio/wav", headers={"X-Speech-Id": speech.id})

    def _post_speech(self, query: dict[str, str]) -> None:
        name = Path(query.get("name") or "upload").name[:120] or "upload"
        speech = self.server.add_speech(lambda: self._body(MAX_UPLOAD_BYTES), name)
        self._json(speech.describe(self._engine.fps), HTTPStatus.CREATED)


# ---------------------------------------------------------------------------------------------


def _token_for(host: str, token: Optional[str]) -> Optional[str]:
    """The token requests must carry: ``token`` if given ("" turns the check off), else a random one off loopback."""
    if token is not None:
        return token or None
    return None if is_loopback(host) else new_token()


def _bind(host: str, port: int, token: Optional[str] = None) -> _ViewerHTTPServer:
    """Listen on host:port, or say in one sentence why not (port taken, not allowed, bad host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return _ViewerHTTPServer((host, port), family, _token_for(host, token))
    except socket.gaierror:
        raise AvatarError(f"cannot listen on host {host!r}: it is not an address of this machine; "
                          f"use --host 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces).") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise AvatarError(f"port {port} on {host} is already in use (another viewer?); stop that "
                              f"program or choose another port with --port.") from None
        if err.errno in (errno.EACCES, errno.EPERM):
            raise AvatarError(f"not allowed to listen on port {port}; choose a port above 1023 with --port.") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise AvatarError(f"cannot listen on host {host!r}: it is not an address of this machine; "
                              f"use --host 127.0.0.1 or 0.0.0.0.") from None
        raise


def _url(httpd: _ViewerHTTPServer) -> str:
    """The page's URL on this machine, with the token when one is needed (a wildcard bind: by loopback)."""
    host, port = str(httpd.server_address[0]), int(httpd.server_address[1])
    if host in WILDCARD_HOSTS:
        host = "::1" if host == "::" else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/" + (f"?token={httpd.token}" if httpd.token else "")


def _warn_if_exposed(httpd: _ViewerHTTPServer) -> None:
    """Log where a viewer beyond loopback really listens, and what that exposes."""
    warning = exposure_warning(str(httpd.server_address[0]), int(httpd.server_address[1]), httpd.token)
    if warning is not None:
        log.warning("%s", warning)


def serve(run_dir: Path | str, host: str = "127.0.0.1", port: int = 7860, audio: Optional[Path | str] = None,
          device: str = "auto", size: Optional[int] = None, ready: Optional[Callable[[str], None]] = None,
          progress: Optional[Progress] = None, token: Optional[str] = None,
          subject: Optional[Path | str] = None) -> None:
    """Serve the viewer of a run until Ctrl-C, then close the port and return.

    The port is taken before the model loads, so a busy port fails at once.

    Args:
        run_dir: a run written by ``avatar train``.
        host, port: where to listen (127.0.0.1: this machine only). Any other address is logged as a
            warning: anyone on the network can connect (with the token).
        audio: a speech file to offer (and start with) besides the subject's own audio.
        device: ``auto``, ``cpu`` or ``cuda``; the avatar renders there.
        size: side of the rendered frames, pixels; None: the training resolution.
        ready: called with the page's URL (with ``?token=`` when one is needed) once the viewer answers.
        progress: reports loading (frame cache, speech features).
        token: the token every request must carry; None: a random one when ``host`` is not
            loopback, none on loopback; "": none (not advised off loopback).
        subject: the run's subject directory, when it has moved since training.

    Raises:
        AvatarError: the port is taken or not allowed, the run or audio is unusable.
    """
    httpd = _bind(host, port, token)
    try:
        httpd.attach(ViewerEngine(run_dir, audio=audio, device=device, size=size, progress=progress, subject=subject))
        url = _url(httpd)
        log.info("Viewer of %s at %s", run_dir, url)
        if ready is not None:
            ready(url)
        _warn_if_exposed(httpd)
        httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        log.info("Viewer stopped.")
    finally:
        httpd.server_close()


@dataclass
class RunningViewer:
    """A viewer serving from a background thread (see :func:`start`); ``stop()`` closes it."""

    url: str
    """The page's URL, with ``?token=`` when requests need one."""
    engine: ViewerEngine
    _httpd: _ViewerHTTPServer
    _thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def token(self) -> Optional[str]:
        """The token requests must carry (None: no token needed)."""
        return self._httpd.token

    def stop(self) -> None:
        """Stop answering, close the port and wait for the server thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "RunningViewer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(run_dir: Path | str, host: str = "127.0.0.1", port: int = 0, audio: Optional[Path | str] = None,
          device: str = "auto", size: Optional[int] = None, progress: Optional[Progress] = None,
          engine: Optional[ViewerEngine] = None, token: Optional[str] = None,
          subject: Optional[Path | str] = None) -> RunningViewer:
    """Start the viewer in a background thread and return once it answers.

    ``port=0`` picks a free port (read it from the result's ``url`` or ``port``). ``engine``
    reuses an already loaded run (then ``run_dir``, ``audio``, ``device`` and ``size`` are unused).
    ``token`` as in :func:`serve`.

    Raises:
        AvatarError: as :func:`serve`.
    """
    httpd = _bind(host, port, token)
    try:
        httpd.attach(engine or ViewerEngine(run_dir, audio=audio, device=device, size=size, progress=progress,
                                            subject=subject))
    except BaseException:
        httpd.server_close()
        raise
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"avatar-viewer-{httpd.server_address[1]}", daemon=True)
    thread.start()
    _warn_if_exposed(httpd)
    return RunningViewer(_url(httpd), httpd.engine, httpd, thread)
