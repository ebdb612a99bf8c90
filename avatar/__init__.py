"""avatar: photoreal 3D talking-head avatars from a few minutes of video.

The package is usable from Python without the command line; ``avatar.cli`` is a thin layer
over the library functions. Importing the package does no work and loads no models.
"""

__version__ = "0.1.0"

from avatar.errors import AvatarError  # noqa: E402

__all__ = ["AvatarError", "__version__"]
