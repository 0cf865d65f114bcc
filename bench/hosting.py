"""Benchmark targets served from processes of their own, so several can be up at once and all
but the one under load stopped (SIGSTOP).

This machine's speed drifts by tens of percent within minutes (other tenants of the host):
targets measured one after another are measured on different machines. Up at once and loaded
in turns, they share every phase of the drift. A stopped target spends no CPU (an idle Ray
cluster otherwise runs its controller loop) and keeps its memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from servegraph.graphs.local_cluster import wait_for

ROOT = Path(__file__).resolve().parents[1]
# Runs in the checkout under test, with only what every checkout has: build_targets, `with
# target` and target.details. One command a line on stdin; EOF stops the target.
HOST_SCRIPT = """
import json, os, pathlib, sys
from servegraph.bench.targets import build_targets

def publish(path, text):
    pathlib.Path(path + ".part").write_text(text)
    os.replace(path + ".part", path)  # whole or absent, never half-written

name, model, out = sys.argv[1:4]
_, [target] = build_targets([name], model)
with target as base_url:
    publish(out + ".url", base_url)
    for line in sys.stdin:
        if line.strip() == "details":
            try:
                details = target.details(base_url)
            except Exception as exc:
                details = {"error": f"{type(exc).__name__}: {exc}"}
            publish(out + ".details.json", json.dumps(details))
"""
START_TIMEOUT_S = 900
PACKAGES = ("deployments", "graphs", "models", "autoscale", "bench")


# In every process of a target served from another checkout (PYTHONPATH puts it first): the
# editable install's finder would otherwise quietly serve servegraph.* modules that checkout
# lacks from the main one; without it, they fail to import.
SITECUSTOMIZE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def import_paths(checkout: Path, work_dir: Path) -> list[Path]:
    """PYTHONPATH for a target served from checkout: its own code as `servegraph.*`.

    The editable install maps servegraph.* to the main checkout's folders. Another checkout
    (bench.ab's 'before' worktree) gets a folder of links, first on the path, in its Ray
    workers too (they inherit PYTHONPATH); one from before the namespace also needs its own
    folder on the path, for the top-level names its code imports.
    """
    checkout = checkout.resolve()
    if checkout == ROOT:
        return []
    root = work_dir / f"imports-{checkout.name}-{os.getpid()}"
    (root / "servegraph").mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        link = root / "servegraph" / package
        if not link.is_symlink():
            link.symlink_to(checkout / package, target_is_directory=True)
    (root / "sitecustomize.py").write_text(SITECUSTOMIZE)
    namespaced = "servegraph.deployments" in (checkout / "pyproject.toml").read_text()
    return [root] if namespaced else [root, checkout]


DETAILS_TIMEOUT_S = 600


class Runner(Protocol):
    """What the benchmark loop needs of a target: its name, model and URL, and turns under load."""

    name: str
    model: str
    base_url: str
    within: int | None  # the root of the target's processes, or None when they are not ours

    def start(self, work_dir: Path) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def details(self) -> dict[str, float]: ...
    def stop(self) -> None: ...


@dataclass(eq=False)  # a running process: equal only to itself
class HostedTarget:
    """A target of bench.targets (`servegraph`, `vllm`, `ray-llm`, ...) served by a child process
    from a checkout's code; every Ray cluster it starts is its own (RAY_ADDRESS=local)."""

    target: str
    model: str
    name: str = ""
    checkout: Path = ROOT
    base_url: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)
    _seen: dict[int, psutil.Process] = field(default_factory=dict, repr=False)  # every process ever paused

    def __post_init__(self) -> None:
        self.name = self.name or self.target

    @property
    def label(self) -> str:
        """The name as a file name."""
        return self.name.split()[0]

    @property
    def within(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, work_dir: Path) -> None:
        """Returns once the target serves; raises (and leaves nothing running) if it does not."""
        env = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray cluster of its own
        if paths := import_paths(self.checkout, work_dir):
            env["PYTHONPATH"] = os.pathsep.join(map(str, paths))
        self._out = work_dir / self.label
        with (work_dir / f"{self.label}.log").open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", HOST_SCRIPT, self.target, self.model, str(self._out)],
                cwd=self.checkout,
                env=env,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        url_file = Path(f"{self._out}.url")
        try:
            wait_for(lambda: url_file.exists() or self.process.poll() is not None, START_TIMEOUT_S, f"{self.name}")
            if not url_file.exists():
                raise RuntimeError(f"{self.name} did not start; see {work_dir / self.label}.log")
        except BaseException:
            self.stop()
            raise
        self.base_url = url_file.read_text()

    def details(self) -> dict[str, float]:
        """The target's one-token latencies (the graph's hop figures), measured in its own process."""
        path = Path(f"{self._out}.details.json")
        path.unlink(missing_ok=True)
        self.process.stdin.write("details\n")
        self.process.stdin.flush()
        wait_for(lambda: path.exists() or self.process.poll() is not None, DETAILS_TIMEOUT_S, f"{self.name}'s details")
        if not path.exists():
            raise RuntimeError(f"{self.name} exited while measuring its latencies")
        details = json.loads(path.read_text())
        if "error" in details:
            raise RuntimeError(details["error"])
        return details

    def _processes(self) -> list[psutil.Process]:
        if self.process is None or self.process.poll() is not None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pause(self) -> None:
        """Stops every process of this target. They stop one after another within milliseconds; a
        health check in flight at that moment can time out and count one failure on resume
        (Serve allows several)."""
        for process in self._processes():
            self._seen[process.pid] = process
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Every process ever paused, including any whose parent has died since."""
        for process in [*self._processes(), *self._seen.values()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Asks the target to stop its servers; kills whatever of it is still running after that."""
        if self.process is None:
            return
        self._seen.update((process.pid, process) for process in self._processes())
        self.resume()
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()  # the target leaves its `with` and stops its cluster
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for process in self._seen.values():  # e.g. a server started in a session of its own
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self._seen.clear()


@dataclass(eq=False)
class InPlaceTarget:
    """A target entered in this process and never paused: a server someone else runs (--url)."""

    target: Any  # a bench.targets target: a context manager giving its base URL, with details()
    base_url: str = ""
    within: int | None = None

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def model(self) -> str:
        return self.target.model

    def start(self, work_dir: Path) -> None:
        self.base_url = self.target.__enter__()

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def details(self) -> dict[str, float]:
        return self.target.details(self.base_url)

    def stop(self) -> None:
        self.target.__exit__(None, None, None)


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C: every target is resumed and stopped on the way out,
    so no paused target is left stopped, holding its memory, with Ray's reaper stopped inside it."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: sys.exit(128 + number))
