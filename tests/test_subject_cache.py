"""The subject's uint8 frame cache: built once, read one frame at a time, rebuilt when damaged."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from avatar.errors import InputError
from avatar.subject import FrameFile, Subject


def test_frame_file_reads_items_by_position(tmp_path):
    data = np.arange(4 * 3 * 5 * 2, dtype=np.uint8).reshape(4, 3, 5, 2)
    path = tmp_path / "a.u8"
    path.write_bytes(data.tobytes())
    frames = FrameFile(path, data.shape)
    assert len(frames) == 4 and frames.shape == data.shape
    for i in (0, 2, 3, -1):
        item = frames[i]
        assert item.dtype == np.uint8 and item.flags.writeable
        np.testing.assert_array_equal(item, data[i])
    with pytest.raises(IndexError):
        frames[4]
    frames.close()


def test_frame_file_refuses_a_file_of_the_wrong_size(tmp_path):
    path = tmp_path / "a.u8"
    path.write_bytes(bytes(10))
    with pytest.raises(InputError, match="rebuild"):
        FrameFile(path, (4, 2, 2))


def test_image_cache_matches_the_frames_is_reused_and_rebuilt_when_truncated(small_subject):
    _, subject_dir = small_subject
    subject = Subject(subject_dir)
    frames, masks = subject.image_cache(64)
    assert frames.shape == (subject.n_frames, 64, 64, 3) and masks.shape == (subject.n_frames, 64, 64)
    i = subject.n_frames // 2
    expected = cv2.resize(subject.frame(i), (64, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(frames[i], expected)
    np.testing.assert_array_equal(masks[i], cv2.resize(subject.mask(i), (64, 64), interpolation=cv2.INTER_NEAREST))

    path = subject.paths.cache_dir / "frames_64.u8"
    built = path.stat().st_mtime_ns
    subject.image_cache(64)
    assert path.stat().st_mtime_ns == built  # reused, not rebuilt

    with open(path, "r+b") as f:  # an interrupted copy, say
        f.truncate(path.stat().st_size // 2)
    frames, _ = subject.image_cache(64)
    np.testing.assert_array_equal(frames[i], expected)
    assert not list(subject.paths.cache_dir.glob("*.partial"))
