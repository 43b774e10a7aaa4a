"""Activation-range calibration: data readers and observers."""
