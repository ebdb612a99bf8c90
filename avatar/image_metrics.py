"""Image-quality metrics of the field: PSNR, SSIM, LPIPS, and the D-SSIM training loss.

Metric functions (:func:`psnr`, :func:`ssim`, :func:`lpips_or_none`) take images as the
rasterizer returns them, channels last, ``[H, W, C]`` or a batch ``[B, H, W, C]``, float in
[0, 1] (uint8 arrays are divided by 255), as numpy arrays or torch tensors, and return a Python
float: the mean over the batch of the per-image value, as papers report per-frame averages.
They compute in float64 without gradients.

:func:`dssim_loss` is the differentiable twin for training and accepts either layout.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

SSIM_WINDOW = 11
"""Side of the Gaussian SSIM window (Wang et al. 2004)."""
SSIM_SIGMA = 1.5
"""Standard deviation of the SSIM window, in pixels."""
SSIM_K1, SSIM_K2 = 0.01, 0.03
"""Stabilising constants: C1 = (K1 L)^2, C2 = (K2 L)^2 with L the data range."""

ImageLike = Any  # np.ndarray | Tensor; kept loose so numpy users need not import torch types


def _to_batch(image: ImageLike, name: str) -> Tensor:
    """``[H, W, C]`` or ``[B, H, W, C]`` (numpy or torch; uint8 scaled to [0, 1]) -> float64 ``[B, H, W, C]``."""
    t = torch.from_numpy(np.asarray(image)) if not isinstance(image, Tensor) else image.detach()
    if t.dtype == torch.uint8:
        t = t.double() / 255.0
    elif not t.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1] or uint8, got dtype {t.dtype}")
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"{name} must be [H, W, C] or [B, H, W, C], got shape {tuple(t.shape)}")
    return t.double()


def _pair(pred: ImageLike, target: ImageLike) -> tuple[Tensor, Tensor]:
    p, t = _to_batch(pred, "pred"), _to_batch(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    return p, t.to(p.device)


def psnr(pred: ImageLike, target: ImageLike, mask: Optional[ImageLike] = None, *, max_val: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, averaged over the images of a batch.

    Args:
        pred, target: images [H, W, C] or [B, H, W, C], float in [0, max_val] (or uint8).
        mask: bool [H, W] or [B, H, W]: only these pixels count (e.g. the head region); all
            channels of a selected pixel count.
        max_val: the data range's peak.

    Returns:
        The mean over images of ``10 log10(max_val^2 / MSE)``. Identical images give
        ``inf`` (not a capped value: a cap would silently bias means, and ``inf`` cannot be
        mistaken for a real score); any identical image in a batch makes the mean ``inf``.

    Raises:
        ValueError: shapes differ, or the mask is the wrong shape or selects no pixel of an image.
    """
    p, t = _pair(pred, target)
    sq = (p - t).square().mean(dim=-1)  # [B, H, W]
    if mask is None:
        mse = sq.flatten(1).mean(dim=1)
    else:
        m = torch.from_numpy(np.asarray(mask)) if not isinstance(mask, Tensor) else mask
        m = m.to(device=sq.device, dtype=torch.bool)
        if m.dim() == 2 and m.shape == sq.shape[1:]:
            m = m[None].expand_as(sq)
        if m.shape != sq.shape:
            raise ValueError(f"mask must be [H, W] or [B, H, W] = {list(sq.shape)}, got {tuple(m.shape)}")
        counts = m.flatten(1).sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError(f"mask selects no pixel in image(s) {(counts == 0).nonzero().flatten().tolist()}")
        mse = (sq * m).flatten(1).sum(dim=1) / counts
    values = 10.0 * torch.log10(max_val**2 / mse)  # mse == 0 -> inf
    return float(values.mean())


JITTER_REFERENCE_SIZE = 512
"""Head jitter is reported in pixels of a frame this size, as LMD is, so runs at 256 and 512 compare."""


class TemporalStability:
    """Flicker and jitter of a rendered sequence against the true one, over consecutive frames.

    Users of the field's avatars complain most about heads that shimmer and wobble, which a
    per-frame PSNR cannot see: a frame can be close to the truth while its neighbour is close in
    another way. Both figures compare *changes* between consecutive frames (``t`` and ``t + 1`` of
    the subject), so true motion cancels:

    - ``temporal_psnr_head``: PSNR of ``(render[t+1] - render[t]) - (truth[t+1] - truth[t])`` over
      the head region of either frame (higher is steadier; a render that repeats the truth's
      motion exactly is infinite);
    - ``head_jitter_px``: mean length of ``(c_render[t+1] - c_render[t]) - (c_true[t+1] - c_true[t])``,
      with ``c`` the centroid of the rendered head's alpha and of the true head mask, in pixels at
      :data:`JITTER_REFERENCE_SIZE` (how far the silhouette moves that the real head did not).
    """

    def __init__(self, resolution: int):
        self._scale = JITTER_REFERENCE_SIZE / float(resolution)
        self._previous: Optional[tuple] = None
        self._sse, self._count = 0.0, 0
        self._jitter: list[float] = []

    @staticmethod
    def _centroid(weight: Tensor) -> Optional[Tensor]:
        total = weight.sum()
        if float(total) <= 0:
            return None
        ys, xs = torch.meshgrid(torch.arange(weight.shape[0], dtype=weight.dtype),
                                torch.arange(weight.shape[1], dtype=weight.dtype), indexing="ij")
        return torch.stack([(weight * xs).sum(), (weight * ys).sum()]) / total

    def add(self, index: int, pred: Tensor, truth: Tensor, pred_alpha: Tensor, head_mask: Tensor) -> None:
        """Frame ``index`` of the sequence (only pairs of consecutive indices count).

        Args:
            pred, truth: float images in [0, 1]. [H, W, 3]
            pred_alpha: the rendered head's alpha. [H, W]
            head_mask: the true head region (bool). [H, W]
        """
        pred, truth = pred.detach().float().cpu(), truth.detach().float().cpu()
        alpha, mask = pred_alpha.detach().float().cpu(), head_mask.detach().bool().cpu()
        state = (int(index), pred, truth, mask, self._centroid(alpha), self._centroid(mask.float()))
        if self._previous is not None and state[0] == self._previous[0] + 1:
            _, p0, t0, m0, cp0, ct0 = self._previous
            region = mask | m0
            if bool(region.any()):
                diff = ((pred - p0) - (truth - t0)).square().mean(dim=-1)[region]
                self._sse += float(diff.sum())
                self._count += int(diff.numel())
            if None not in (state[4], cp0, state[5], ct0):
                moved = (state[4] - cp0) - (state[5] - ct0)
                self._jitter.append(float(moved.norm()) * self._scale)
        self._previous = state

    def result(self) -> dict[str, Optional[float]]:
        """``temporal_psnr_head`` and ``head_jitter_px``; None without a consecutive pair."""
        psnr_value = None
        if self._count:
            mse = self._sse / self._count
            psnr_value = float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
        return {"temporal_psnr_head": psnr_value,
                "head_jitter_px": float(np.mean(self._jitter)) if self._jitter else None}


class RegionErrors:
    """Squared error pooled per label region over many frames: where a render is wrong.

    A frame-level PSNR says how wrong a render is; this says where (face, hair, mouth interior,
    background...), which is what decides what to improve. Errors are pooled over all pixels of
    a region across frames (one MSE per region, not a mean of per-frame PSNRs), so a region that
    is small in some frames does not swing the figure.

    Usage::

        errors = RegionErrors(MASK_LEGEND)
        for pred, gt, labels in frames:
            errors.add(pred, gt, labels)
        errors.psnr()   # {"face": 24.1, "hair": 20.3, ...}
        errors.share()  # {"face": 0.26, "hair": 0.47, ...}, summing to 1
    """

    def __init__(self, legend: dict[int, str]):
        self.legend = dict(legend)
        self._sse = {name: 0.0 for name in self.legend.values()}
        self._count = {name: 0 for name in self.legend.values()}

    def add(self, pred: ImageLike, target: ImageLike, labels: ImageLike) -> None:
        """Add one frame: images [H, W, C] (as :func:`psnr` takes them), labels int [H, W].

        Pixels whose label is not in the legend are ignored.
        """
        p, t = _pair(pred, target)
        if p.shape[0] != 1:
            raise ValueError(f"RegionErrors.add takes one frame [H, W, C], got a batch of {p.shape[0]}")
        sq = (p[0] - t[0]).square().mean(dim=-1)  # [H, W]
        lab = torch.from_numpy(np.array(labels)) if not isinstance(labels, Tensor) else labels
        if tuple(lab.shape) != tuple(sq.shape):
            raise ValueError(f"labels must be [H, W] = {tuple(sq.shape)}, got {tuple(lab.shape)}")
        lab = lab.to(sq.device)
        for value, name in self.legend.items():
            m = lab == value
            self._sse[name] += float(sq[m].sum())
            self._count[name] += int(m.sum())

    def psnr(self, max_val: float = 1.0) -> dict[str, Optional[float]]:
        """PSNR of the pooled MSE of each region; None for a region no frame had (inf if exact)."""
        out: dict[str, Optional[float]] = {}
        for name, n in self._count.items():
            if n == 0:
                out[name] = None
                continue
            mse = self._sse[name] / n
            out[name] = float("inf") if mse == 0 else float(10 * np.log10(max_val**2 / mse))
        return out

    def share(self) -> dict[str, float]:
        """Each region's part of the total squared error (0..1, summing to 1; zeros if exact)."""
        total = sum(self._sse.values())
        return {name: (v / total if total > 0 else 0.0) for name, v in self._sse.items()}


def _gauss_kernel(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised 1D Gaussian window [SSIM_WINDOW]."""
    x = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - (SSIM_WINDOW - 1) / 2
    k = torch.exp(-x.square() / (2 * SSIM_SIGMA**2))
    return k / k.sum()


def _ssim_map(x: Tensor, y: Tensor, padding: Literal["valid", "reflect"], max_val: float) -> Tensor:
    """Per-pixel SSIM of channels-first images [B, C, H, W] -> [B, C, H', W'].

    ``valid`` keeps only windows inside the image (the metric, as in Wang et al. and
    scikit-image); ``reflect`` pads so every pixel gets a value and a gradient (training).
    """
    channels = x.shape[1]
    k = _gauss_kernel(x.dtype, x.device)
    kh = k.reshape(1, 1, -1, 1).expand(channels, 1, -1, 1)
    kw = k.reshape(1, 1, 1, -1).expand(channels, 1, 1, -1)
    if padding == "reflect":
        pad = SSIM_WINDOW // 2
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(z, kh, groups=channels), kw, groups=channels)

    # One pass over the five moments: stack them along the batch.
    n = x.shape[0]
    moments = blur(torch.cat([x, y, x * x, y * y, x * y]))
    mu_x, mu_y, xx, yy, xy = moments.split(n)
    var_x = xx - mu_x.square()
    var_y = yy - mu_y.square()
    cov = xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * max_val) ** 2, (SSIM_K2 * max_val) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    return num / den


def ssim(pred: ImageLike, target: ImageLike, *, max_val: float = 1.0) -> float:
    """Structural similarity (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), batch mean.

    Matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=max_val, channel_axis=-1)``: only windows wholly
    inside the image are averaged, each channel separately.

    Args:
        pred, target: images [H, W, C] or [B, H, W, C], float in [0, max_val] (or uint8),
            at least 11 x 11.

    Returns:
        Mean SSIM in [-1, 1]; 1 for identical images.

    Raises:
        ValueError: shapes differ or the images are smaller than the window.
    """
    p, t = _pair(pred, target)
    if p.shape[1] < SSIM_WINDOW or p.shape[2] < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {p.shape[1]}x{p.shape[2]}")
    with torch.no_grad():
        value = _ssim_map(p.permute(0, 3, 1, 2), t.permute(0, 3, 1, 2), "valid", max_val).mean()
    return float(value)


def dssim_loss(
    pred: Tensor,
    target: Tensor,
    *,
    layout: Literal["auto", "BCHW", "BHWC"] = "auto",
    max_val: float = 1.0,
) -> Tensor:
    """Differentiable structural dissimilarity ``(1 - SSIM) / 2``, the 3DGS training term.

    Same window and constants as :func:`ssim`, but the images are reflect-padded so that every
    pixel, borders included, gets a gradient (3DGS zero-pads, which darkens the border means).

    Args:
        pred: rendered images, [B, 3, H, W] ("BCHW") or [B, H, W, 3] ("BHWC", the rasterizer's
            layout), or either without the batch dimension; H, W >= 6.
        target: same shape as ``pred``; no gradient needed.
        layout: "auto" reads channels-last when the last dimension is 1, 3 or 4 and the
            third-from-last is not, else channels-first; pass it explicitly when ambiguous.
        max_val: the data range's peak.

    Returns:
        Scalar tensor in [0, 1], the mean over batch, channels and pixels; 0 for identical images.

    Raises:
        ValueError: shapes differ, the layout cannot be read, or the images are too small.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dim() == 3:
        pred, target = pred[None], target[None]
    if pred.dim() != 4:
        raise ValueError(f"dssim_loss needs [B, C, H, W] or [B, H, W, C] images, got shape {tuple(pred.shape)}")
    if layout == "auto":
        last_is_channel = pred.shape[-1] in (1, 3, 4) and pred.shape[1] not in (1, 3, 4)
        layout = "BHWC" if last_is_channel else "BCHW"
    if layout == "BHWC":
        pred, target = pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)
    elif layout != "BCHW":
        raise ValueError(f"layout must be 'auto', 'BCHW' or 'BHWC', got {layout!r}")
    if min(pred.shape[-2:]) <= SSIM_WINDOW // 2:
        raise ValueError(f"dssim_loss needs H, W > {SSIM_WINDOW // 2}, got {tuple(pred.shape[-2:])}")
    value = _ssim_map(pred, target.to(pred.dtype), "reflect", max_val).mean()
    return (1.0 - value) / 2.0


@functools.lru_cache(maxsize=4)
def _load_lpips(net: str, device: str) -> Optional[torch.nn.Module]:
    """The LPIPS network, or None when the package or its weights are unavailable.

    Cached, so the (slow) load and the info message happen once per (net, device).
    """
    try:
        import lpips  # optional: needs torchvision and downloadable backbone weights
    except ImportError as err:
        log.info("LPIPS unavailable (%s); reporting lpips as null", err)
        return None
    try:
        model = lpips.LPIPS(net=net, verbose=False).to(device).eval()
    except Exception as err:  # noqa: BLE001 - any failure (offline download, bad file) means "no LPIPS"
        log.info("LPIPS weights for %r could not be loaded (%s); reporting lpips as null", net, err)
        return None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lpips_network(net: str = "alex", device: str = "cpu") -> Optional[torch.nn.Module]:
    """The frozen LPIPS network (inputs BCHW in [-1, 1]), or None when it cannot be loaded.

    For the training loss: gradients flow to the images, never to the network. Shared with
    :func:`lpips_or_none` (one load per net and device).
    """
    return _load_lpips(net, str(device))


def lpips_or_none(pred: ImageLike, target: ImageLike, *, net: str = "alex") -> Optional[float]:
    """LPIPS distance (lower is better) when the ``lpips`` package and its weights load, else None.

    LPIPS is optional (it needs torchvision and weights that may need a download), so the
    evaluation reports ``null`` instead of failing; the reason is logged once at info level.

    Args:
        pred, target: images [H, W, 3] or [B, H, W, 3] in [0, 1] (or uint8).
        net: backbone, "alex" (the field's usual choice) or "vgg".

    Returns:
        The batch mean, or None when LPIPS is unavailable.
    """
    p, t = _pair(pred, target)
    model = _load_lpips(net, str(p.device))
    if model is None:
        return None
    with torch.no_grad():
        x = p.float().permute(0, 3, 1, 2) * 2 - 1
        y = t.float().permute(0, 3, 1, 2) * 2 - 1
        return float(model(x, y).mean())


__all__ = ["TemporalStability", "dssim_loss", "lpips_network", "lpips_or_none", "psnr", "ssim"]
