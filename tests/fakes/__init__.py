"""Fakes for tests: real servers on loopback ports that imitate engines."""
