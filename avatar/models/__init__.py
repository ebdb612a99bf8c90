"""The avatar kinds and their learned parts: encodings, audio conditioning and deformation networks.

Pure PyTorch; devices and dtypes follow the inputs. Each component has a ``@dataclass`` config
(JSON-serialisable with ``dataclasses.asdict``, rebuilt with ``Config.from_dict``) whose
``setup()`` builds the module.
"""

from avatar.models.audio import (
    AudioAttention,
    AudioConditioner,
    AudioEncoder,
    AudioEncoderConfig,
    gather_neighbourhoods,
)
from avatar.models.deformation import (
    FaceDeformation,
    FaceDeformationConfig,
    FaceDeformationOutput,
    MouthDeformation,
    MouthDeformationConfig,
    apply_deformation,
    quaternion_multiply,
)
from avatar.models.encodings import TriPlaneConfig, TriPlaneEncoding
from avatar.models.interface import AvatarModel, FrameCondition
from avatar.models.ngp import NGPHead, NGPHeadConfig
from avatar.models.talking_head import TalkingHead, TalkingHeadConfig

MODEL_KINDS: dict[str, tuple[type, type]] = {"gaussian": (TalkingHeadConfig, TalkingHead), "ngp": (NGPHeadConfig, NGPHead)}
"""Each avatar kind's (config class, model class). The model class has
``from_state_dict(config, tensors)`` and implements :class:`AvatarModel`."""

__all__ = [
    "MODEL_KINDS",
    "AudioAttention",
    "NGPHead",
    "NGPHeadConfig",
    "AvatarModel",
    "FrameCondition",
    "TalkingHead",
    "TalkingHeadConfig",
    "AudioConditioner",
    "AudioEncoder",
    "AudioEncoderConfig",
    "FaceDeformation",
    "FaceDeformationConfig",
    "FaceDeformationOutput",
    "MouthDeformation",
    "MouthDeformationConfig",
    "TriPlaneConfig",
    "TriPlaneEncoding",
    "apply_deformation",
    "gather_neighbourhoods",
    "quaternion_multiply",
]
