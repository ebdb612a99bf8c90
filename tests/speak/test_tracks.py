"""What speech cannot say: pose loop and natural blinks."""

from __future__ import annotations

import numpy as np

from avatar.speak import auto_blinks, blink_events, loop_indices, pose_track


def test_pose_loop_has_no_jump_and_blinks_are_natural():
    train_idx = np.arange(10, 20)
    seq = loop_indices(train_idx, 50)
    assert np.abs(np.diff(seq)).max() == 1
    frames, c2w = pose_track("loop", 30, train_idx, 40)
    assert c2w is None and len(frames) == 30
    subject = np.zeros((500, 2), np.float32)
    for start in range(20, 500, 90):  # a blink every 3.6 s
        subject[start:start + 5] = [[0.4, 0.4], [0.9, 0.9], [1.0, 1.0], [0.9, 0.9], [0.4, 0.4]]
    blinks = auto_blinks(subject, 25 * 60, 25.0, seed=0)
    events = blink_events(blinks.mean(axis=1))
    gaps = np.diff([a for a, _ in events]) / 25.0
    assert 8 <= len(events) <= 30 and np.all(gaps >= 1.0)
