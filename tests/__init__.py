"""mqtool test suite."""
