"""vLLM's engine processes end with the process that started them.

A Serve engine replica owns vLLM's engine core process, which owns its workers. When the
replica is killed outright (SIGKILL: the OOM killer, `ray stop --force`, `ray.kill`, a node
drain), it cannot shut them down: they live on under init, holding their memory (on a GPU
node, the GPU memory its replacement needs). `watch_parent` runs in every vLLM process as a
vLLM general plugin (see pyproject.toml); in a process that vLLM started with multiprocessing
it exits as soon as the parent is gone, so a dead replica's engine core and workers follow it.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable

CHECK_INTERVAL_S = 1.0
ORPHAN_EXIT_CODE = 70


def parent_gone(parent_pid: int, current_parent: Callable[[], int] = os.getppid) -> bool:
    """A child's parent is gone once the child has been handed to another (init or a subreaper)."""
    return current_parent() != parent_pid


def watch_parent() -> None:
    """vLLM general plugin: in vLLM's child processes, exit when the parent process dies."""
    parent = multiprocessing.parent_process()
    if parent is None:  # a front end or replica process: nothing above to follow
        return
    parent_pid = parent.pid  # the starter's, even if it died before this process got here

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(CHECK_INTERVAL_S):
            if parent_gone(parent_pid):
                os._exit(ORPHAN_EXIT_CODE)  # the parent cannot ask any more; nothing here is worth keeping

    threading.Thread(target=watch, name="servegraph-parent-watch", daemon=True).start()
