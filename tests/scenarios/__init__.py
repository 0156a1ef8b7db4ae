"""Scenario scripts that need a Ray cluster of their own: each test runs one in a subprocess."""
