"""Data and labels per domain."""
