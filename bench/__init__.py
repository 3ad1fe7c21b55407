"""rankone's benchmarks: each module is a script run as ``python -m bench.<module>``."""
