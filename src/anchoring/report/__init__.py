"""Figures (matplotlib, Agg) and a self-contained HTML report."""
