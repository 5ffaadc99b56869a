"""Shipped domain packs (data, not code): domains/<name>/pack.yaml plus data files."""
