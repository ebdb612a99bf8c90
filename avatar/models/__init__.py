"""The avatar's learned parts: encodings, audio conditioning and deformation networks.

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

__all__ = [
    "AudioAttention",
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
