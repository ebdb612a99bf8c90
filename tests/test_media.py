from pathlib import Path

import numpy as np
import pytest

from avatar import media
from avatar.errors import InputError
from tests.conftest import tone, write_test_video


def _frames(n: int, w: int = 96, h: int = 64):
    for i in range(n):
        yield np.full((h, w, 3), (i * 7) % 256, np.uint8)


def test_write_probe_and_read_back(tmp_path: Path):
    wav = media.write_wav(tmp_path / "a.wav", tone(2.0))
    out = media.write_video(tmp_path / "v.mp4", _frames(50), fps=25, audio=wav)
    info = media.probe(out)
    assert info.has_video and info.has_audio
    assert (info.width, info.height) == (96, 64)
    assert info.fps == pytest.approx(25)
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    frames = list(media.iter_frames(out))
    assert len(frames) == 50 and frames[0].shape == (64, 96, 3)
    audio = media.load_audio(out)
    assert len(audio) == pytest.approx(32000, abs=1600)
    assert not list(tmp_path.glob(".*partial*")), "temporary files must be gone"


def test_iter_frames_resamples_crops_and_resizes(tmp_path: Path):
    out = media.write_video(tmp_path / "v.mp4", _frames(30), fps=30)
    frames = list(media.iter_frames(out, fps=15, crop=media.Crop(8, 4, 64, 48), size=(32, 24)))
    assert len(frames) == 15
    assert frames[0].shape == (24, 32, 3)


def test_wav_round_trip(tmp_path: Path):
    x = tone(0.5)
    media.write_wav(tmp_path / "t.wav", x)
    y, rate = media.read_wav(tmp_path / "t.wav")
    assert rate == media.AUDIO_RATE
    np.testing.assert_allclose(x, y, atol=1e-4)


def test_unreadable_inputs_raise_input_error(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        media.probe(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a readable"):
        media.probe(junk)
    silent = media.write_video(tmp_path / "silent.mp4", _frames(10), fps=25)
    with pytest.raises(InputError, match="no audio stream"):
        media.load_audio(silent)


def test_failed_write_leaves_nothing(tmp_path: Path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with media.VideoWriter(target, fps=25) as writer:
            for frame in _frames(5):
                writer.write(frame)
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_output_in_missing_directory(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        media.write_wav(tmp_path / "nope" / "a.wav", tone(0.1))


# -- hostile input: files that point ffmpeg at other files, files that lie about their length -------------


def _playlists(tmp_path: Path) -> list[Path]:
    """An HLS playlist and an ffconcat list, each pointing at a real local audio file (the 'secret')."""
    secret = media.write_wav(tmp_path / "secret.wav", tone(1.0, freq=440.0))
    hls = tmp_path / "speech.m3u8"
    hls.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n")
    concat = tmp_path / "speech.ffconcat"
    concat.write_text("ffconcat version 1.0\nfile secret.wav\n")
    return [hls, concat]


def test_allowed_demuxers_exist_in_the_bundled_ffmpeg():
    import subprocess

    listing = subprocess.run([media.ffmpeg_exe(), "-hide_banner", "-demuxers"], capture_output=True, text=True).stdout
    names = {name for line in listing.splitlines() if len(parts := line.split()) > 1 and parts[0].startswith("D")
             for name in parts[1].split(",")}
    assert set(media.SAFE_INPUT_FORMATS) <= names, set(media.SAFE_INPUT_FORMATS) - names
    assert not {"hls", "concat", "dash", "image2", "tty", "ffmetadata"} & set(media.SAFE_INPUT_FORMATS)


@pytest.mark.parametrize("ext", ["wav", "mp3", "flac", "ogg", "m4a", "webm", "mkv", "avi"])
def test_ordinary_containers_still_decode(tmp_path: Path, ext: str):
    import subprocess

    wav = media.write_wav(tmp_path / "a.wav", tone(1.0))
    out = tmp_path / f"a.{ext}"
    subprocess.run([media.ffmpeg_exe(), "-loglevel", "error", "-i", str(wav), str(out)], check=True)
    assert len(media.load_audio(out)) == pytest.approx(media.AUDIO_RATE, abs=2000)  # codec padding


def test_playlists_and_concat_lists_are_refused(tmp_path: Path):
    refused = "not an audio or video file this toolkit reads"
    for listing in _playlists(tmp_path):
        for read in (media.probe, media.load_audio, lambda p: media.decode_audio_to_wav(p, tmp_path / "out.wav"),
                     lambda p: list(media.iter_frames(p))):
            with pytest.raises(InputError, match=refused):
                read(listing)
        with pytest.raises(InputError, match="upload.m3u8 is not an audio"):
            media.load_audio_bytes(listing.read_bytes(), "upload.m3u8")
        with pytest.raises(InputError, match=refused):
            with media.VideoWriter(tmp_path / "v.mp4", fps=25, audio=listing) as writer:
                writer.write(np.zeros((16, 16, 3), np.uint8))
    assert not (tmp_path / "out.wav").exists() and not (tmp_path / "v.mp4").exists()


def test_refused_even_when_the_probe_is_skipped(tmp_path: Path, monkeypatch):
    """The decoding commands carry the allow-lists themselves (the probe is not the only guard)."""
    hls = _playlists(tmp_path)[0]
    real = media.probe(media.write_wav(tmp_path / "ok.wav", tone(0.5)))
    monkeypatch.setattr(media, "probe", lambda path, name=None: real)
    with pytest.raises(InputError, match="not an audio or video file"):
        media.load_audio(hls)
    with pytest.raises(InputError, match="not an audio or video file"):
        media.decode_audio_to_wav(hls, tmp_path / "out.wav")
    with pytest.raises(InputError, match="not an audio or video file"):
        with media.VideoWriter(tmp_path / "v.mp4", fps=25, audio=hls) as writer:
            for frame in _frames(30, 16, 16):
                writer.write(frame)
    assert not (tmp_path / "v.mp4").exists()


def test_a_file_named_like_a_url_is_a_local_file(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    media.write_wav(tmp_path / "http:x.wav", tone(0.5))
    assert len(media.load_audio("http:x.wav")) == media.AUDIO_RATE // 2


def test_too_long_audio_is_refused_before_decoding(tmp_path: Path, monkeypatch):
    import subprocess

    long = tmp_path / "silence.flac"  # a small file of a long silence
    subprocess.run([media.ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono",
                    "-t", "120", str(long)], check=True)
    assert long.stat().st_size < 200_000

    commands: list[list[str]] = []
    real_popen = media.subprocess.Popen

    def recording_popen(command, *args, **kwargs):
        commands.append(command)
        return real_popen(command, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(media.subprocess, "Popen", recording_popen)
        with pytest.raises(InputError, match="silence.flac is 120 s long; at most 60 s"):
            media.load_audio(long, max_seconds=60)
    assert commands and not [c for c in commands if "s16le" in c], "refused from the probe alone, not decoded"
    assert len(media.load_audio(long, max_seconds=200)) == 120 * media.AUDIO_RATE


def test_decoding_stops_at_the_cap_when_the_header_lies(tmp_path: Path, monkeypatch):
    wav = media.write_wav(tmp_path / "long.wav", tone(8.0))
    real_probe = media.probe

    def lying_probe(path, name=None):
        import dataclasses

        return dataclasses.replace(real_probe(path, name), duration_s=None)

    monkeypatch.setattr(media, "probe", lying_probe)
    with pytest.raises(InputError, match="longer than 3 s"):
        media.load_audio(wav, max_seconds=3)
    assert len(media.load_audio(wav, max_seconds=8)) == 8 * media.AUDIO_RATE


def test_uploads_are_decoded_in_a_scratch_directory_that_goes_away(tmp_path, monkeypatch):
    import tempfile

    from tests.conftest import tone

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    wav = media.write_wav(tmp_path / "speech.wav", tone(0.5))
    samples = media.load_audio_bytes(wav.read_bytes(), "../../evil name.wav")
    assert abs(len(samples) - media.AUDIO_RATE // 2) <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav"], "no upload left behind"


def test_audio_that_starts_after_the_video_is_decoded_on_the_video_clock(tmp_path: Path):
    """A remuxed clip whose sound starts 0.2 s into the video: the decoded speech starts 0.2 s in
    too (silence before), as the frames do; read from the stream's first sample it would lead the
    mouth by 0.2 s in training and in ``eval --drive``."""
    import subprocess

    clip = write_test_video(tmp_path / "clip.mp4", lambda i: np.full((64, 64, 3), 128, np.uint8), 25)
    late = tmp_path / "late.mp4"
    subprocess.run([media.ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(clip), "-itsoffset", "0.2",
                    "-i", str(clip), "-map", "0:v", "-map", "1:a", "-c", "copy", str(late)], check=True)

    def onset(samples: np.ndarray) -> float:
        return int(np.argmax(np.abs(samples) > 0.05)) / media.AUDIO_RATE

    on_time, delayed = media.load_audio(clip), media.load_audio(late)
    assert onset(delayed) - onset(on_time) == pytest.approx(0.2, abs=0.01)
    seconds = media.decode_audio_to_wav(late, tmp_path / "late.wav")
    assert onset(media.read_wav_segment(tmp_path / "late.wav", 0, int(seconds * media.AUDIO_RATE))) == \
        pytest.approx(onset(delayed), abs=1e-3)
