"""Activation-range calibration: data readers, streaming observers, and `calibrate`."""

from calibration.calibrate import CalibrationOptions, calibrate
from calibration.observers import METHODS, Observer, StreamingHistogram
from calibration.readers import CalibrationDataReader, iter_feeds

__all__ = [
    "METHODS",
    "CalibrationDataReader",
    "CalibrationOptions",
    "Observer",
    "StreamingHistogram",
    "calibrate",
    "iter_feeds",
]
