"""Hostile input to the viewer: foreign Host names, cross-site POSTs, the token, playlists, long audio, floods.

All traffic stays on 127.0.0.1; loops and waits are bounded.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

from avatar import media
from avatar.viewer import security, server, start
from tests.conftest import tone


def _request(port: int, method: str, path: str, headers: Optional[dict[str, str]] = None,
             body: Optional[bytes] = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; ``headers`` may replace Host."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _error(body: bytes) -> str:
    return json.loads(body)["error"]


def _speech_ids(viewer) -> list[str]:
    return [s["id"] for s in json.loads(_request(viewer.port, "GET", "/api/speeches")[2])]


# -- Host (DNS rebinding) ----------------------------------------------------------------------------------


def test_foreign_host_names_are_refused(viewer):
    port = viewer.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::1", "a:b:c"):
        status, _, body = _request(port, "GET", "/api/info", {"Host": host})
        assert status == 403 and "host" in _error(body), host
    status, _, body = _request(port, "GET", "/", {"Host": "evil.example"})
    assert status == 403 and b"<canvas" not in body, "a rebinding page cannot read the viewer's page either"
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert _request(port, "GET", "/api/info", {"Host": host})[0] == 200, host


def test_host_check_of_a_wildcard_bind_accepts_ip_literals_and_this_machine():
    guard = security.RequestGuard("0.0.0.0", 7860, token="t")
    assert guard.host_allowed("192.168.1.20:7860") and guard.host_allowed("[fe80::1]:7860")
    assert guard.host_allowed(socket.gethostname()) and guard.host_allowed("localhost")
    assert not guard.host_allowed("evil.example") and not guard.host_allowed(None)
    named = security.RequestGuard("Viewer.Lan", 7860, token="t")
    assert named.host_allowed("viewer.lan:7860") and not named.host_allowed("192.168.1.20")


# -- Origin (cross-site request forgery) -------------------------------------------------------------------


def test_cross_site_posts_change_nothing(viewer, tmp_path):
    port = viewer.port
    state = {"yaw": 45}
    before = json.loads(_request(port, "GET", "/api/state?session=csrf")[2])
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"https://127.0.0.1:{port}"}, {"Origin": f"http://127.0.0.1:{port + 1}"},
                    {"Referer": "http://evil.example/page.html"}):
        status, response_headers, body = _request(port, "POST", "/api/state?session=csrf",
                                                  {"Content-Type": "text/plain", **headers}, json.dumps(state).encode())
        assert status == 403 and "another site" in _error(body), headers
        assert response_headers.get("Connection") == "close", "the unread body must not become the next request"
    assert json.loads(_request(port, "GET", "/api/state?session=csrf")[2]) == before

    speeches = _speech_ids(viewer)
    wav = media.write_wav(tmp_path / "csrf.wav", tone(0.5)).read_bytes()
    status, _, body = _request(port, "POST", "/api/speech?name=csrf.wav", {"Origin": "http://evil.example"}, wav)
    assert status == 403 and _speech_ids(viewer) == speeches, "no upload from another site"

    own = {"Origin": f"http://127.0.0.1:{port}", "Referer": f"http://127.0.0.1:{port}/"}
    status, _, body = _request(port, "POST", "/api/state?session=csrf", own, json.dumps(state).encode())
    assert status == 200 and json.loads(body)["yaw"] == 45, "the page's own POST works"
    status, _, body = _request(port, "POST", "/api/state?session=csrf", {"Referer": f"http://127.0.0.1:{port}/x"},
                               b"{}")
    assert status == 200, "Referer of the page itself, without Origin"


# -- token (listening beyond loopback) ---------------------------------------------------------------------


def test_token_is_needed_off_loopback_only():
    assert server._token_for("127.0.0.1", None) is None and server._token_for("localhost", None) is None
    assert server._token_for("::1", None) is None
    first, second = server._token_for("0.0.0.0", None), server._token_for("192.168.1.20", None)
    assert first and second and first != second and len(first) >= 32
    assert server._token_for("0.0.0.0", "") is None and server._token_for("127.0.0.1", "given") == "given"


def test_token_in_the_url_once_then_a_cookie(viewer):
    token = security.new_token()
    with start(viewer.engine.run_dir, engine=viewer.engine, token=token) as guarded:
        port = guarded.port
        assert guarded.url == f"http://127.0.0.1:{port}/?token={token}" and guarded.token == token
        for path in ("/", "/api/info", f"/api/info?token={token[:-1]}", "/api/frame?session=t&t=0"):
            status, _, body = _request(port, "GET", path)
            assert status == 403 and "token" in _error(body), path
        assert _request(port, "GET", "/api/info", {"Authorization": "token nope"})[0] == 403
        assert _request(port, "GET", "/api/info", {"Cookie": "avatar-viewer-token-1=" + token})[0] == 403

        status, headers, body = _request(port, "GET", f"/?token={token}")
        assert status == 200 and b"<canvas" in body
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"avatar-viewer-token-{port}={token};")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        jar = {"Cookie": cookie.split(";")[0]}
        assert _request(port, "GET", "/api/info", jar)[0] == 200, "the page's own requests carry the cookie"
        assert _request(port, "GET", "/api/frame?session=t&t=0", jar)[0] == 200
        assert _request(port, "GET", "/api/info", {"Authorization": f"token {token}"})[0] == 200
        status, _, body = _request(port, "GET", f"/api/frame?session=t&t=0&token={token}")
        assert status == 200, body[:200]  # the token is not taken for a view setting
        status, _, _ = _request(port, "POST", "/api/state?session=t", {**jar, "Origin": "http://evil.example"}, b"{}")
        assert status == 403, "the token does not make a cross-site POST acceptable"


def test_listening_beyond_loopback_is_said_and_warned():
    assert security.exposure_warning("127.0.0.1", 7860, None) is None
    assert security.exposure_warning("::1", 7860, None) is None
    warning = security.exposure_warning("0.0.0.0", 7860, "abc")
    assert warning is not None
    assert "all interfaces (0.0.0.0)" in warning and "port 7860" in warning and "anyone" in warning
    assert f"http://{socket.gethostname()}:7860/?token=abc" in warning and "no TLS" in warning
    lan = security.exposure_warning("192.168.1.20", 8000, "abc")
    assert lan is not None and "http://192.168.1.20:8000/?token=abc" in lan


# -- uploads: playlists, long audio, one at a time ---------------------------------------------------------


def test_uploaded_playlists_never_read_local_files(viewer, tmp_path):
    secret = media.write_wav(tmp_path / "secret.wav", tone(1.0, freq=440.0))
    uploads = {
        "speech.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n",
        "speech.ffconcat": f"ffconcat version 1.0\nfile {secret}\n",
        "speech.txt": f"ffconcat version 1.0\nfile {secret}\n",
    }
    speeches = _speech_ids(viewer)
    for name, text in uploads.items():
        status, _, body = _request(viewer.port, "POST", f"/api/speech?name={name}",
                                   {"Content-Type": "application/octet-stream"}, text.encode())
        assert status == 400, (name, body)
        assert name in _error(body) and ("not an audio or video file" in _error(body)
                                         or "not a readable" in _error(body)), _error(body)
        assert str(tmp_path) not in _error(body)
    assert _speech_ids(viewer) == speeches, "nothing was added: the secret's audio is not served"


def test_too_long_upload_is_refused_without_decoding(viewer, tmp_path):
    long = tmp_path / "silence.flac"  # a few kB holding 11 minutes
    subprocess.run([media.ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono",
                    "-t", "660", str(long)], check=True)
    speeches = _speech_ids(viewer)
    started = time.monotonic()
    status, _, body = _request(viewer.port, "POST", "/api/speech?name=silence.flac",
                               {"Content-Type": "application/octet-stream"}, long.read_bytes())
    assert status == 400 and "silence.flac is 660 s long; at most 600 s" in _error(body)
    assert time.monotonic() - started < 20 and _speech_ids(viewer) == speeches


def test_one_upload_at_a_time_and_a_size_cap(viewer, tmp_path):
    wav = media.write_wav(tmp_path / "a.wav", tone(0.5)).read_bytes()
    slot = viewer._httpd._upload_slot
    assert slot.acquire(timeout=30)
    try:
        status, _, body = _request(viewer.port, "POST", "/api/speech?name=a.wav", {}, wav)
        assert status == 503 and "another upload" in _error(body)
    finally:
        slot.release()
    conn = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=30)
    try:  # announce a huge body and send none of it: refused from the header alone
        conn.putrequest("POST", "/api/speech?name=big.wav")
        conn.putheader("Content-Length", str(server.MAX_UPLOAD_BYTES + 1))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and response.getheader("Connection") == "close"
    finally:
        conn.close()


# -- connections and memory --------------------------------------------------------------------------------


def test_connections_are_bounded_and_idle_ones_dropped(viewer, monkeypatch):
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(server._Handler, "timeout", 3.0)
    with start(viewer.engine.run_dir, engine=viewer.engine) as bounded:
        threads_before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", bounded.port), timeout=10) for _ in range(3)]
        time.sleep(0.3)
        extra = [socket.create_connection(("127.0.0.1", bounded.port), timeout=2.0) for _ in range(7)]
        try:
            for sock in extra:  # turned away at once (well before the idle timeout), without a thread
                assert sock.recv(4096).startswith(b"HTTP/1.1 503 Service Unavailable")
            assert threading.active_count() - threads_before <= 3
            for sock in idle:  # dropped after the idle timeout
                sock.settimeout(10)
                assert sock.recv(4096) == b""
        finally:
            for sock in idle + extra:
                sock.close()
        deadline = time.monotonic() + 10
        while _request(bounded.port, "GET", "/api/info")[0] != 200:
            assert time.monotonic() < deadline, "slots are given back"
            time.sleep(0.1)


def test_frames_of_all_clients_render_on_one_thread(viewer, monkeypatch):
    """One renderer thread: memory does not grow with the number of clients (a malloc arena per thread)."""
    names: set[str] = set()
    render = viewer.engine.render

    def recording_render(state):
        names.add(threading.current_thread().name)
        return render(state)

    monkeypatch.setattr(viewer.engine, "render", recording_render)
    clients = [threading.Thread(target=_request, args=(viewer.port, "GET", f"/api/frame?session=m{k}&t=0.{k}"))
               for k in range(6)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=120)
    assert len(names) == 1 and next(iter(names)).startswith("avatar-viewer-render"), names


def test_page_calls_only_relative_same_origin_urls():
    """The token cookie reaches the API only if the page calls its own origin (relative /api/... URLs)."""
    page = (Path(server.__file__).parent / "static" / "index.html").read_text()
    assert "fetch(\"/api/" in page and "http://" not in page.split("<script>", 1)[-1]
