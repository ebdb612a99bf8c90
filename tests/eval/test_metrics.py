"""Image metrics (PSNR, SSIM, D-SSIM, LPIPS) and mouth metrics (tracker, LMD, correlations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avatar.eval.landmarks import (
    MOUTH,
    MouthTracker,
    audio_envelope,
    inner_lip_opening,
    lip_sync_correlation,
    lmd,
    mouth_correlation,
)
from avatar.image_metrics import dssim_loss, lpips_or_none, psnr, ssim


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).random((32, 40, 3))


# ------------------------------------------------------------------------------- PSNR


def test_psnr_identical_is_inf(image: np.ndarray) -> None:
    assert psnr(image, image) == math.inf


def test_psnr_constant_offset(image: np.ndarray) -> None:
    # MSE = 0.1^2 -> 10 log10(1 / 0.01) = 20 dB, for numpy, torch and uint8 input alike.
    assert psnr(image * 0.5 + 0.1, image * 0.5) == pytest.approx(20.0)
    assert psnr(torch.from_numpy(image).float() * 0.5 + 0.1, torch.from_numpy(image).float() * 0.5) == \
        pytest.approx(20.0, abs=1e-4)
    a = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255.0**2 / 100.0))


def test_psnr_mask_restricts_pixels(image: np.ndarray) -> None:
    pred = image.copy()
    pred[:16] += 0.2  # top half wrong
    pred[16:] += 0.05
    mask = np.zeros(image.shape[:2], bool)
    mask[16:] = True
    assert psnr(pred, image, mask) == pytest.approx(10 * math.log10(1 / 0.05**2))
    assert psnr(pred, image, ~mask) == pytest.approx(10 * math.log10(1 / 0.2**2))
    with pytest.raises(ValueError, match="no pixel"):
        psnr(pred, image, np.zeros_like(mask))
    with pytest.raises(ValueError, match="mask must be"):
        psnr(pred, image, mask[:8])


def test_psnr_batch_is_mean_of_images(image: np.ndarray) -> None:
    batch = np.stack([image, image])
    pred = np.stack([image + 0.1, image + 0.01])
    assert psnr(pred, batch) == pytest.approx((20.0 + 40.0) / 2)
    with pytest.raises(ValueError, match="same shape"):
        psnr(pred, image)


# ------------------------------------------------------------------------------- SSIM


def test_ssim_identical_is_one_and_drops_with_noise(image: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    assert ssim(image, image) == pytest.approx(1.0)
    values = [ssim(np.clip(image + rng.normal(0, s, image.shape), 0, 1), image) for s in (0.02, 0.1, 0.3)]
    assert values[0] < 1.0 and values[0] > values[1] > values[2]


def test_ssim_matches_scikit_image(image: np.ndarray) -> None:
    from skimage.metrics import structural_similarity

    other = np.clip(image + np.random.default_rng(2).normal(0, 0.1, image.shape), 0, 1)
    ref = structural_similarity(other, image, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0, channel_axis=-1)
    assert ssim(other, image) == pytest.approx(ref, abs=1e-9)
    batched = ssim(np.stack([other, image]), np.stack([image, image]))
    assert batched == pytest.approx((ref + 1.0) / 2, abs=1e-9)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(image[:8], image[:8])


def test_dssim_loss_zero_for_identical_and_layouts_agree(image: np.ndarray) -> None:
    x = torch.from_numpy(image).float()[None]  # [1, H, W, 3]
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    assert float(dssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    bhwc = dssim_loss(y, x)
    bchw = dssim_loss(y.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2))
    torch.testing.assert_close(bhwc, bchw)
    torch.testing.assert_close(dssim_loss(y[0], x[0], layout="BHWC"), bhwc)
    assert 0.0 < float(bhwc) < 0.5
    with pytest.raises(ValueError, match="layout"):
        dssim_loss(y, x, layout="HWC")  # type: ignore[arg-type]


def test_dssim_loss_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 2, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.rand(1, 2, 7, 8, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda p: dssim_loss(p, target, layout="BCHW"), (pred,), fast_mode=True)


def test_lpips_is_none_without_the_package(image: np.ndarray) -> None:
    pytest.importorskip("torch")
    try:
        import lpips  # noqa: F401
    except ImportError:
        assert lpips_or_none(image, image) is None
    else:
        pytest.skip("lpips is installed here; the None path is not reachable")


# ------------------------------------------------------------------------------- landmarks


def synthetic_landmarks(t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((t, 478, 2)) * 200


def test_lmd_zero_for_identical_and_shift_invariant() -> None:
    lm = synthetic_landmarks(5)
    assert lmd(lm, lm, 256) == 0.0
    shifted = lm + np.array([13.0, -7.0])
    shifted[2] += 30.0  # a per-frame shift too
    assert lmd(shifted, lm, 256) == pytest.approx(0.0, abs=1e-9)


def test_lmd_value_scales_to_512_and_skips_missing() -> None:
    lm = synthetic_landmarks(4)
    pred = lm.copy()
    # Move the outer lip loop up by 2 px and the inner loop down by 2 px: after centring each
    # landmark is 2 px off.
    from avatar import topology

    pred[:, list(topology.LIPS_OUTER), 1] -= 2.0
    pred[:, list(topology.LIPS_INNER), 1] += 2.0
    pred[:, 5] = 1e6  # not a lip landmark: ignored
    assert len(MOUTH) == 40
    assert lmd(pred, lm, 256) == pytest.approx(4.0)  # 2 px at 256 -> 4 px at 512
    pred[1] = np.nan
    assert lmd(pred, lm, 512) == pytest.approx(2.0)
    assert math.isnan(lmd(np.full_like(lm, np.nan), lm, 256))
    with pytest.raises(ValueError, match="same shape"):
        lmd(lm[:2], lm, 256)


def test_inner_lip_opening_is_normalised() -> None:
    lm = np.zeros((2, 478, 2))
    lm[:, 33] = [0.0, 0.0]
    lm[:, 263] = [100.0, 0.0]
    lm[:, 13] = [50.0, 60.0]
    lm[:, 14] = [50.0, 70.0]
    lm[1] *= 3.0  # the same face, three times bigger
    np.testing.assert_allclose(inner_lip_opening(lm), [0.1, 0.1])
    lm[0, 14] = np.nan
    assert np.isnan(inner_lip_opening(lm)[0])


def test_mouth_correlation_nan_safe() -> None:
    t = np.linspace(0, 4 * np.pi, 100)
    a = np.sin(t)
    b = 2 * np.sin(t) + 1
    b[10] = np.nan
    assert mouth_correlation(a, b) == pytest.approx(1.0)
    assert mouth_correlation(a, -b) == pytest.approx(-1.0)
    assert math.isnan(mouth_correlation(a, np.zeros(100)))  # a frozen mouth: undefined, not 0
    with pytest.raises(ValueError, match="same length"):
        mouth_correlation(a, b[:50])


@pytest.mark.parametrize("lag", [-3, 0, 2])
def test_lip_sync_correlation_finds_the_lag(lag: int) -> None:
    rng = np.random.default_rng(0)
    env = np.convolve(rng.random(140), np.ones(5) / 5, mode="same")  # speech-like, not periodic
    opening = np.roll(env, lag)[10:-10] + 0.01 * rng.standard_normal(120)
    corr, found = lip_sync_correlation(opening, env[10:-10], max_lag=4)
    assert found == lag and corr > 0.9


def test_lip_sync_correlation_lagged_sine() -> None:
    t = np.arange(200)
    env = np.sin(2 * np.pi * t / 37.0)
    opening = np.sin(2 * np.pi * (t - 3) / 37.0)  # the mouth trails by 3 frames
    corr, lag = lip_sync_correlation(opening, env, max_lag=4)
    assert lag == 3 and corr == pytest.approx(1.0, abs=1e-3)
    assert lip_sync_correlation(np.zeros(200), env) == (pytest.approx(math.nan, nan_ok=True), 0)


def test_audio_envelope_follows_loudness() -> None:
    rate, fps = 16_000, 25
    t = np.arange(2 * rate) / rate
    loud = (t >= 0.8) & (t < 1.2)
    samples = np.where(loud, 0.5, 0.01) * np.sin(2 * np.pi * 200 * t)
    env = audio_envelope(samples, fps, 50)
    assert env.shape == (50,) and env.max() == pytest.approx(1.0)
    assert env[25] > 0.9 and env[5] < 0.05 and env[45] < 0.05
    raw = audio_envelope(samples, fps, 60, smooth_frames=0)  # past the audio: silent
    assert raw[55] == 0.0
    assert audio_envelope(np.zeros(rate), fps, 5).tolist() == [0.0] * 5
    assert audio_envelope(samples, fps, 1).shape == (1,)
    with pytest.raises(ValueError, match="mono"):
        audio_envelope(np.zeros((2, 100)), fps, 5)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    from avatar import media
    from avatar.sample import SampleConfig, make_sample

    paths = make_sample(tmp_path_factory.mktemp("sample"), SampleConfig(duration_s=2, size=256))
    frames = list(media.iter_frames(paths.video))
    samples, rate = media.read_wav(paths.audio)
    return frames, samples, rate, np.load(paths.truth)


def test_mouth_tracker_on_the_sample(sample) -> None:
    frames, samples, rate, truth = sample
    lm = MouthTracker().track(frames)
    assert lm.shape == (len(frames), 478, 2) and lm.dtype == np.float32
    assert np.isfinite(lm).all()  # a face in every frame
    assert 0 <= lm[..., 0].min() and lm[..., 0].max() < 256
    opening = inner_lip_opening(lm)
    assert mouth_correlation(opening, truth["mouth_open"]) > 0.8
    env = audio_envelope(samples, 25, len(frames), rate=rate, smooth_frames=0)
    np.testing.assert_allclose(env, truth["audio_envelope"], atol=0.02)
    corr, lag = lip_sync_correlation(opening, audio_envelope(samples, 25, len(frames), rate=rate))
    assert corr > 0.3 and abs(lag) <= 4
    stills = MouthTracker(video=False).track(frames[:3])
    assert lmd(stills, lm[:3], 256) < 3.0


def test_mouth_tracker_no_face_and_bad_input() -> None:
    lm = MouthTracker(video=False).track([np.zeros((64, 64, 3), np.uint8)])
    assert lm.shape == (1, 478, 2) and np.isnan(lm).all()
    assert MouthTracker().track([]).shape == (0, 478, 2)
    with pytest.raises(ValueError, match="uint8"):
        MouthTracker().track([np.zeros((64, 64, 3), np.float32)])


# ------------------------------------------------------------------------------- regions


def test_region_errors_pool_per_label_and_share_the_total() -> None:
    from avatar.image_metrics import RegionErrors

    gt = np.zeros((4, 6, 3))
    labels = np.zeros((4, 6), np.int64)
    labels[:, 3:] = 2  # right half: "face"
    pred = gt.copy()
    pred[:, 3:] = 0.1  # face error 0.01 (20 dB), background exact
    errors = RegionErrors({0: "background", 2: "face", 4: "hair"})
    errors.add(pred, gt, labels)
    pred2 = gt.copy()
    pred2[:, :3] = 0.1  # second frame: the error moves to the background
    pred2[:, 3:] = 0.0
    errors.add(pred2, gt, labels)
    psnrs = errors.psnr()
    # Pooled over both frames each region has half its pixels at MSE 0.01: MSE 0.005.
    assert psnrs["face"] == pytest.approx(10 * math.log10(1 / 0.005))
    assert psnrs["background"] == pytest.approx(10 * math.log10(1 / 0.005))
    assert psnrs["hair"] is None  # no pixel of that label in any frame
    assert errors.share() == pytest.approx({"background": 0.5, "face": 0.5, "hair": 0.0})
    exact = RegionErrors({0: "background"})
    exact.add(gt, gt, labels * 0)
    assert exact.psnr() == {"background": math.inf} and exact.share() == {"background": 0.0}
    with pytest.raises(ValueError, match="labels must be"):
        errors.add(pred, gt, labels[:2])


def test_temporal_stability_sees_flicker_and_wobble_but_not_true_motion():
    import torch

    from avatar.image_metrics import TemporalStability

    def square(x: int) -> torch.Tensor:
        mask = torch.zeros(32, 32, dtype=torch.bool)
        mask[8:20, x:x + 12] = True
        return mask

    truth = [torch.rand(32, 32, 3) for _ in range(4)]
    steady = TemporalStability(256)
    for i, t in enumerate(truth):  # the render moves exactly as the truth does (the head slides right)
        steady.add(i, t.clone(), t, square(4 + i).float(), square(4 + i))
    assert steady.result() == {"temporal_psnr_head": float("inf"), "head_jitter_px": 0.0}

    shaky = TemporalStability(256)
    for i, t in enumerate(truth):
        flicker = torch.where(square(4)[..., None], 0.1 * (-1) ** i, 0.0)
        shaky.add(i, (t + flicker), t, square(4 + 2 * (i % 2)).float(), square(4))
    result = shaky.result()
    # The head flickers by +-0.1 (a 0.2 jump between frames, over 144 of the 144 head pixels).
    assert result["temporal_psnr_head"] == pytest.approx(10 * np.log10(1 / 0.04), abs=0.01)
    assert result["head_jitter_px"] == pytest.approx(2.0 * 512 / 256)  # 2 px wobble at 256 -> 4 px at 512

    apart = TemporalStability(256)
    for i in (0, 2, 4):  # no two frames are neighbours: nothing to compare
        apart.add(i, truth[0], truth[1], square(4).float(), square(4))
    assert apart.result() == {"temporal_psnr_head": None, "head_jitter_px": None}
