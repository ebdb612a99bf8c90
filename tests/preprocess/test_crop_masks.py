import numpy as np

from avatar.preprocess.detect import CropConfig, Detections, _follow_largest, place_crop
from avatar.preprocess.masks import label_map
from avatar.preprocess.track import fill_gaps
from avatar.subject import LABEL, split_frames


def _dets(boxes, size=(1280, 720)):
    boxes = np.asarray(boxes, float)
    return Detections(times=np.arange(len(boxes)) / 5.0, boxes=boxes, n_faces=np.ones(len(boxes), int),
                      source_size=size)


def test_crop_is_square_inside_frame_and_frames_the_head():
    det = _dets([[600, 200, 700, 300]] * 10)
    crop = place_crop(det, CropConfig(face_scale=2.6, down_shift=0.25))
    assert crop.w == crop.h == 260
    assert 0 <= crop.x and crop.x + crop.w <= 1280 and 0 <= crop.y and crop.y + crop.h <= 720
    # the face box sits in the upper-middle of the crop, shoulders below
    assert crop.x < 600 and crop.x + crop.w > 700
    assert crop.y < 200 and crop.y + crop.h > 300 + 100


def test_crop_grows_with_head_motion_and_shrinks_to_fit():
    still = place_crop(_dets([[600, 200, 700, 300]] * 10))
    moving = place_crop(_dets([[600 + 8 * i, 200, 700 + 8 * i, 300] for i in range(10)]))
    assert moving.w > still.w
    big = place_crop(_dets([[100, 100, 600, 600]] * 5))  # ideal crop larger than the frame
    assert big.w == big.h == 720 and big.y == 0


def test_follow_largest_prefers_the_big_face_and_warns():
    big = (np.array([500.0, 100, 700, 300]), 0.9)
    small = (np.array([100.0, 100, 150, 150]), 0.95)
    det = _follow_largest([[small, big]] * 6 + [[big]] * 2, 5.0, (1280, 720))
    np.testing.assert_allclose(det.boxes[0], big[0])
    assert det.warnings and "largest" in det.warnings[0]


def test_label_map_parts():
    h = w = 128
    person = np.zeros((h, w), bool)
    person[10:, 20:108] = True
    lm = np.zeros((478, 3), np.float32)
    # a circle of landmarks as the face oval, a small mouth inside it
    from avatar import topology

    ang = np.linspace(0, 2 * np.pi, len(topology.FACE_OVAL), endpoint=False)
    lm[list(topology.FACE_OVAL), 0] = 64 + 25 * np.sin(ang)
    lm[list(topology.FACE_OVAL), 1] = 50 - 30 * np.cos(ang)
    ang = np.linspace(0, 2 * np.pi, len(topology.LIPS_INNER), endpoint=False)
    lm[list(topology.LIPS_INNER), 0] = 64 + 8 * np.cos(ang)
    lm[list(topology.LIPS_INNER), 1] = 65 + 3 * np.sin(ang)
    labels = label_map(person, lm)
    assert labels[0, 0] == LABEL["background"]
    assert labels[50, 64] == LABEL["face"]
    assert labels[65, 64] == LABEL["mouth_interior"]
    assert labels[110, 64] == LABEL["torso_neck"]  # below the chin
    assert labels[30, 30] == LABEL["hair"]  # beside the head, above ear level
    assert labels[120, 25] == LABEL["torso_neck"]  # shoulders
    no_face = label_map(person, None)
    assert set(np.unique(no_face)) == {LABEL["background"], LABEL["torso_neck"]}


def test_fill_gaps_interpolates_short_runs_only():
    t = 20
    lm = np.arange(t, dtype=np.float32)[:, None, None] * np.ones((1, 478, 3), np.float32)
    valid = np.ones(t, bool)
    valid[3:5] = False  # short gap
    valid[8:16] = False  # long gap
    lm[~valid] = np.nan
    filled, usable = fill_gaps(lm, valid, max_gap=3)
    np.testing.assert_allclose(filled[3:5, 0, 0], [3, 4])
    assert usable[3:5].all() and not usable[8:16].any()
    assert np.isnan(filled[10]).all()


def test_split_is_last_eleventh():
    s = split_frames(220)
    assert s == {"train": [0, 200], "val": [200, 220]}
