"""Speech in, a talking avatar out: the one speech driver and ``render_speech`` on top of it."""

from avatar.models.talking_head import BLINK_NAMES
from avatar.speak.driver import (
    DrivenFrames,
    DriveOptions,
    DrivePlan,
    SampleSpeech,
    SpeechDriver,
    SpeechSource,
    WavSpeech,
)
from avatar.speak.render import RenderOptions, RenderSummary, render_speech, rendered_batches
from avatar.speak.tracks import auto_blinks, blink_events, blink_track, loop_indices, pose_track

__all__ = [
    "BLINK_NAMES",
    "DriveOptions",
    "DrivePlan",
    "DrivenFrames",
    "RenderOptions",
    "RenderSummary",
    "SampleSpeech",
    "SpeechDriver",
    "SpeechSource",
    "WavSpeech",
    "auto_blinks",
    "blink_events",
    "blink_track",
    "loop_indices",
    "pose_track",
    "render_speech",
    "rendered_batches",
]
