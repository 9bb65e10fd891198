"""Shared helpers for lazyfs tests (daemons, fixtures, test data)."""
