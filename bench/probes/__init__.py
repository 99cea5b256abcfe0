"""One-off GPU probes: each answers one question (bench/probes/README.md)."""
