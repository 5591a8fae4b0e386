"""Helpers shared by the test suite: child processes and fault injection."""
