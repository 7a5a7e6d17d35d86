"""Builders for test fixtures that are too large or too slow to commit (tiny model folders, synthetic cases)."""
