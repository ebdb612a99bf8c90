"""HuBERT and wav2vec 2.0 hidden states through ``transformers``, from local weights only."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np
import torch

from avatar.audio.config import FEATURE_KINDS, AudioFeatureConfig
from avatar.audio.signal import PROGRESS_STEP, padded_segment
from avatar.errors import AvatarError
from avatar.media import AUDIO_RATE
from avatar.progress import Progress, null_progress

log = logging.getLogger(__name__)


def _transformers(kind: str) -> Any:
    """The transformers module, imported here so that ``mel`` never needs it."""
    try:
        import transformers
    except ImportError as e:
        raise AvatarError(
            f"Audio features '{kind}' need the transformers package: install avatar[hubert] "
            f"(or pip install transformers), or use the 'mel' features, which need no weights."
        ) from e
    return transformers


def load_hf(config: AudioFeatureConfig, weights: bool) -> Any:
    """The model (``weights=True``; eval mode, float32) or only its transformers config.

    Raises:
        AvatarError: transformers is missing, the files are not available locally, or the
            checkpoint is not of ``config.kind``.
        ValueError: ``config.layer`` does not exist in the model.
    """
    transformers = _transformers(config.kind)
    model_cls = transformers.HubertModel if config.kind == "hubert" else transformers.Wav2Vec2Model
    name = str(config.model)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        if weights and hf_config.model_type == config.kind:
            log.info("Loading %s model from %s", config.kind, name)
            model = model_cls.from_pretrained(name, config=hf_config, local_files_only=True)
    except (OSError, ValueError) as e:
        if "/" in name and not name.startswith((".", "/", "~")):
            where = f"run 'hf download {name}' once while online"
        else:
            where = "check the directory path, which must hold a save_pretrained model"
        raise AvatarError(
            f"No local {config.kind} {'weights' if weights else 'config'} found for {name!r}: "
            f"{where}, or use the 'mel' features, which need no weights."
        ) from e
    if hf_config.model_type != config.kind:
        other = hf_config.model_type
        hint = f"use '{other}:{name}'" if other in FEATURE_KINDS else "pick a hubert/wav2vec2 model"
        raise AvatarError(f"{name} holds a {other!r} model, not {config.kind!r}: {hint}.")
    n_layers = int(hf_config.num_hidden_layers)
    if not -(n_layers + 1) <= config.layer <= n_layers:
        raise ValueError(
            f"Audio feature layer {config.layer} does not exist in {name}, which has {n_layers} "
            f"layers; expected {-(n_layers + 1)}..{n_layers}."
        )
    return model.float().eval() if weights else hf_config


def conv_geometry(hf_config: Any) -> tuple[int, int]:
    """``(hop, receptive_field)`` in samples of the convolutional feature encoder (320, 400)."""
    hop, field = 1, 1
    for kernel, stride in zip(hf_config.conv_kernel, hf_config.conv_stride):
        field += (kernel - 1) * hop
        hop *= stride
    return hop, field


class HFExtractor:
    """Hidden states of a HuBERT/wav2vec 2.0 model, computed in overlapping chunks.

    Chunks are cut on a fixed grid of ``chunk_s`` of output frames in padded-signal coordinates;
    each is run with ``context_s`` of extra audio on both sides, which is then dropped. The
    features of a frame therefore do not depend on how many video frames are requested. They do
    differ slightly from running the whole utterance at once, because self-attention is global
    and checkpoints with ``feat_extract_norm="group"`` (the *base* models) normalise the first
    convolution over the whole input; ``chunk_s=None`` gives the unchunked result.
    """

    def __init__(
        self, model: Any, config: AudioFeatureConfig, samples: np.ndarray, device: torch.device
    ):
        self.model = model
        self.config = config
        self.device = device
        self.dim = int(model.config.hidden_size)
        self.hop, self.field = conv_geometry(model.config)
        if config.normalize_waveform and samples.size:
            # Statistics of the real audio only; the zero padding then reads as the mean.
            self.mean = float(samples.mean(dtype=np.float64))
            self.inv_std = 1.0 / math.sqrt(float(samples.var(dtype=np.float64)) + 1e-7)
        else:
            self.mean, self.inv_std = 0.0, 1.0

    def __call__(
        self, samples: np.ndarray, pad_left: int, n_padded: int, first: int, stop: int,
        progress: Optional[Progress],
    ) -> np.ndarray:  # [stop - first, hidden]
        report = progress or null_progress
        hop, field = self.hop, self.field
        total = (n_padded - field) // hop + 1  # frames of the whole padded signal
        assert stop <= total, (stop, total)
        rate = AUDIO_RATE / hop
        if self.config.chunk_s is None:
            core, context = total, 0
        else:
            core = max(1, int(round(self.config.chunk_s * rate)))
            context = max(0, int(round(self.config.context_s * rate)))
        grid = range((first // core) * core, stop, core)
        out = np.empty((stop - first, self.dim), np.float32)
        report(PROGRESS_STEP, 0, len(grid))
        for i, a in enumerate(grid):
            b = min(a + core, total)
            a_in, b_in = max(0, a - context), min(total, b + context)  # frames the model computes
            segment = padded_segment(
                samples, pad_left, n_padded, a_in * hop, (b_in - 1) * hop + field,
                offset=self.mean, scale=self.inv_std,
            )
            hidden = self._hidden(torch.from_numpy(segment).to(self.device))  # [b_in - a_in, D]
            assert hidden.shape[0] == b_in - a_in, (hidden.shape, a_in, b_in)
            lo, hi = max(a, first), min(b, stop)
            out[lo - first : hi - first] = hidden[lo - a_in : hi - a_in].cpu().numpy()
            report(PROGRESS_STEP, i + 1, len(grid))
        return out

    @torch.inference_mode()
    def _hidden(self, segment: torch.Tensor) -> torch.Tensor:  # [S] -> [K, D]
        if self.config.layer == -1:
            return self.model(segment[None]).last_hidden_state[0].float()
        result = self.model(segment[None], output_hidden_states=True)
        return result.hidden_states[self.config.layer][0].float()
