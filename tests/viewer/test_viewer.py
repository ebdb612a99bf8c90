"""The viewer server: the page, the frame/state/speech API the page uses, several tabs, errors."""

from __future__ import annotations

import _thread
import io
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import wave
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from avatar import media
from avatar.cli import main
from avatar.errors import AvatarError
from avatar.viewer import start
from tests.conftest import tone


def _get(url: str, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _image(body: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "the frame is not a decodable JPEG"
    return image.astype(np.float32)


def _frame(viewer, session: str, **settings) -> tuple[np.ndarray, dict]:
    query = "&".join(f"{k}={v}" for k, v in {"session": session, **settings}.items())
    status, headers, body = _get(f"{viewer.url}api/frame?{query}")
    assert status == 200, body
    assert headers["Content-Type"] == "image/jpeg"
    return _image(body), json.loads(headers["X-Frame-Info"])


def test_page_and_info(viewer):
    status, headers, body = _get(viewer.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert '<canvas id="view"' in page and "/api/frame" in page and "<audio" in page
    status, _, body = _get(viewer.url + "api/info")
    info = json.loads(body)
    assert status == 200 and info["size"] == 64 and info["fps"] == 25.0 and info["device"] == "cpu"
    assert info["default_speech"] == "subject" and info["speeches"][0]["id"] == "subject"
    assert info["speeches"][0]["n_frames"] == info["n_subject_frames"] == 150
    assert info["blink"] and "eye_blink_left" in info["motion_features"]
    assert _get(viewer.url + "nothing")[0] == 404


def test_frame_api_camera_layers_blink(viewer):
    image, meta = _frame(viewer, "tab-a", t=1.0)
    assert image.shape == (64, 64, 3)
    assert meta["frame"] == 25 and meta["pose_frame"] == 25 and meta["render_ms"] > 0
    assert len(meta["audio_code"]) > 0 and set(meta["motion"]) >= {"eye_blink_left", "eye_blink_right"}

    status, state = _post(viewer.url + "api/state?session=tab-a",
                          json.dumps({"yaw": 30, "zoom": 1.5, "blink": 0.9, "follow": False, "frame": 3}).encode())
    assert status == 200 and state["yaw"] == 30 and state["blink"] == 0.9 and state["t"] == 1.0
    turned, meta = _frame(viewer, "tab-a")
    assert meta["pose_frame"] == 3 and meta["motion"]["eye_blink_left"] == 0.9 == meta["motion"]["eye_blink_right"]
    assert np.abs(turned - image).mean() > 1.0, "another camera gives another image"

    _frame(viewer, "tab-a", yaw=0, zoom=1, blink="", follow=1)
    same, meta = _frame(viewer, "tab-a")
    assert np.abs(same - image).mean() < 1.0 and meta["motion"]["eye_blink_left"] != 0.9, "settings reset"

    flat, meta = _frame(viewer, "tab-a", face=0, mouth=0, background=0)
    assert meta["layers"] == [] and flat.std() < 2.0, "no layers: flat grey"
    head_only, _ = _frame(viewer, "tab-a", face=1, mouth=1)
    assert head_only.std() > flat.std() + 1.0
    dotted, _ = _frame(viewer, "tab-a", points=1)
    assert np.abs(dotted - head_only).max() > 50, "Gaussian centres drawn"


def test_bad_requests_say_what_is_wrong(viewer):
    status, _, body = _get(viewer.url + "api/frame?session=tab-b&zoom=near")
    assert status == 400 and "zoom" in json.loads(body)["error"]
    status, _, body = _get(viewer.url + "api/frame?t=1")
    assert status == 400 and "session" in json.loads(body)["error"]
    status, answer = _post(viewer.url + "api/state?session=tab-b", b"[1, 2]")
    assert status == 400 and "JSON object" in answer["error"]
    status, answer = _post(viewer.url + "api/speech?name=noise.wav", b"this is not audio", "application/octet-stream")
    assert status == 400 and "noise.wav" in answer["error"]


def test_uploaded_speech_drives_frames(viewer, tmp_path):
    wav = media.write_wav(tmp_path / "hello.wav", tone(1.5, freq=220.0))
    status, speech = _post(viewer.url + "api/speech?name=hello.wav", wav.read_bytes(), "application/octet-stream")
    assert status == 201, speech
    assert speech["name"] == "hello.wav" and speech["n_frames"] == 38 and speech["duration_s"] == pytest.approx(1.52)
    assert speech["id"] in [s["id"] for s in json.loads(_get(viewer.url + "api/speeches")[2])]

    image, meta = _frame(viewer, "tab-c", speech=speech["id"], t=1.2)
    assert image.shape == (64, 64, 3) and meta["speech"] == speech["id"] and meta["frame"] == 30
    train_end = viewer.engine.data.split("train")[-1]
    assert 0 <= meta["pose_frame"] <= train_end, "new speech borrows training frames' pose, as avatar render"
    _, end = _frame(viewer, "tab-c", t=100)
    assert end["frame"] == 37, "times past the end show the last frame"
    _, subject_frame = _frame(viewer, "tab-c", speech="subject", t=1.2)
    assert subject_frame["audio_code"] != meta["audio_code"], "each speech has its own audio codes"

    status, headers, body = _get(f"{viewer.url}api/speech?id={speech['id']}")
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    with wave.open(io.BytesIO(body)) as wf:
        assert wf.getframerate() == media.AUDIO_RATE and wf.getnframes() == int(1.5 * media.AUDIO_RATE)


def test_tabs_at_once_keep_their_own_state(viewer):
    def tab(k: int) -> list[tuple[float, int]]:
        seen = []
        for i in range(4):
            _, meta = _frame(viewer, f"tab-{k}", yaw=10 * k, t=0.04 * (i + k))
            state = json.loads(_get(f"{viewer.url}api/state?session=tab-{k}")[2])
            seen.append((state["yaw"], meta["frame"]))
        return seen

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(tab, range(3)))
    for k, seen in enumerate(results):
        assert [y for y, _ in seen] == [10 * k] * 4
        assert [f for _, f in seen] == [i + k for i in range(4)]
    assert _get(viewer.url + "api/info")[0] == 200, "still serving"


def test_port_taken_is_a_clear_error(viewer):
    with pytest.raises(AvatarError, match=f"port {viewer.port} on 127.0.0.1 is already in use"):
        start(viewer.engine.run_dir, port=viewer.port, engine=viewer.engine)
    result = CliRunner().invoke(main, ["view", str(viewer.engine.run_dir), "--port", str(viewer.port)])
    assert result.exit_code == 1 and "already in use" in result.output and "Traceback" not in result.output


def test_view_command_serves_until_ctrl_c(viewer_run):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fetched: dict[str, int] = {}

    def browse_then_ctrl_c() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                fetched["status"] = _get(f"http://127.0.0.1:{port}/api/frame?session=cli", timeout=30)[0]
                break
            except OSError:
                time.sleep(0.2)
        _thread.interrupt_main()  # what Ctrl-C does

    # A process started in the background by a non-interactive shell (as CI runners may do)
    # inherits SIGINT ignored, and then Ctrl-C (and interrupt_main) does nothing: give this
    # test the handler a terminal's foreground process has.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        helper = threading.Thread(target=browse_then_ctrl_c, daemon=True)
        helper.start()
        result = CliRunner().invoke(main, ["view", str(viewer_run), "--port", str(port), "--device", "cpu"])
        helper.join(timeout=5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fetched.get("status") == 200
    assert result.exit_code == 0, result.output
    assert f"http://127.0.0.1:{port}/" in result.output and "Viewer stopped." in result.output
    with socket.socket() as again:  # the listening socket is closed: a new viewer can take the port
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does (TIME_WAIT)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_other_size_and_missing_run(viewer_run, tmp_path):
    from avatar.viewer.engine import ViewerEngine
    from avatar.viewer.state import ViewState

    engine = ViewerEngine(viewer_run, device="cpu", size=96)
    for state in (ViewState(t=0.5), ViewState(t=0.5, zoom=0.5, pan_x=0.1, points=True)):
        rendered = engine.render(state)
        assert _image(rendered.jpeg).shape == (96, 96, 3) and rendered.info["size"] == 96
    with pytest.raises(AvatarError, match="not a run directory"):
        start(tmp_path / "nothing", port=0, device="cpu")
