"""Interactive browser viewer: watch and hear a trained avatar talk, with a movable camera.

:func:`serve` blocks until Ctrl-C (the ``avatar view`` command); :func:`start` runs the same
server in a background thread and returns a handle to stop it (tests, notebooks). Frames are
rendered on the run's device and sent to the page as JPEG; the page plays the speech itself and
asks for the frame at its audio clock, so lips stay in sync and slow renders drop frames.
"""

from avatar.viewer.server import RunningViewer, serve, start

__all__ = ["RunningViewer", "serve", "start"]
