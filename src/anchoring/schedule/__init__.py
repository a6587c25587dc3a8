"""Timelines: keyframes, easing, dopesheet CSV, reactive re-targeting."""

from anchoring.schedule.dopesheet import parse_dopesheet, read_dopesheet
from anchoring.schedule.timeline import Timeline
from anchoring.schedule.track import Track, quintic_coeffs

__all__ = ["Timeline", "Track", "parse_dopesheet", "quintic_coeffs", "read_dopesheet"]
