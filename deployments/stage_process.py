"""How a stage's process behaves beside the others on a node: what it writes per call.

Tried and left out (bench.ab, 6 rounds, c=32): the light stages at nice +5 below the engine
processes gave 0.85x the throughput and 1.5x the TTFT: the first token waits behind engine
work, and the relays fall behind without saving any work.
"""

from __future__ import annotations

import logging

SERVE_LOGGER_NAME = "ray.serve"  # the logger Serve's replicas write their per-call access line to


def _not_serve_access_line(record: logging.LogRecord) -> bool:
    return not getattr(record, "serve_access_log", False)  # the mark Serve puts on its access lines


def drop_serve_access_lines() -> None:
    """Stops Serve's per-call access line in this replica: for inner stages, whose calls the
    ingress's `request finished` line already records once per request.

    Serve writes that line unbuffered (see graphs/local_cluster.SERVE_ENV), on every call of every
    stage: it was about 5 % of each inner stage's CPU under load. A filter on Serve's logger itself
    drops the record before any handler formats it, survives Serve re-creating its handlers, and
    leaves our own lines (children of that logger) and Serve's warnings and errors alone.
    """
    logger = logging.getLogger(SERVE_LOGGER_NAME)
    if _not_serve_access_line not in logger.filters:
        logger.addFilter(_not_serve_access_line)
