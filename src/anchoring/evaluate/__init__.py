"""Per-domain metrics."""
