"""Rendering: the Gaussian rasterizer (torch / C++ / gsplat backends) and SH colours."""

from avatar.render.rasterize import rasterize
from avatar.render.sh import spherical_harmonics

__all__ = ["rasterize", "spherical_harmonics"]
