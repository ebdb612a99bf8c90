"""Errors a user can cause and fix.

Library code raises :class:`AvatarError` (or a subclass) for problems with the user's input:
an unreadable file, a video without a face, a wrong directory. The command line turns these
into one clear sentence and a non-zero exit instead of a traceback. Programming errors stay
ordinary exceptions so that they keep their traceback.
"""


class AvatarError(Exception):
    """A problem with the user's input or environment, stated as one sentence saying what to do."""


class InputError(AvatarError):
    """An input file is missing, unreadable, or unsuitable (no face, no audio, too short)."""


class OutputExistsError(AvatarError):
    """The output location already holds something we must not overwrite."""
