"""The measuring side of the harness: CLI, Hydra app, timing, statistics, records and reports."""

__version__ = "0.1.0"
