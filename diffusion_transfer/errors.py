"""Errors of bad user input that the CLI reports as one line (exit status 2) instead of a traceback.

The other expected errors live with the layer that raises them (``DatasetError`` in ``data/``, ``CheckpointError``
in ``io/``, ``MetricError`` in ``metrics/``); ``ConfigError`` is for a configuration value that no run can use
(an unknown option, a backbone a method cannot patch, ...). It is a ``ValueError``, so Python callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the option and says what to set instead."""
