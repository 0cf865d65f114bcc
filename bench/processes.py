"""CPU time and peak memory of every process of a serving stack, per stage, while a load point runs.

Processes are told apart by their titles: Ray names actor processes `ray::ServeReplica:<app>:<deployment>`
(and `ray::ProxyActor`), Serve's HTTP front is `haproxy` or the proxy actor, vLLM names its engine
core and workers `VLLM::...`, and bare vLLM's API server runs `vllm.entrypoints.openai.api_server`.
With several targets up at once, only the processes of the one under load count (`within`).
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

ENGINE_CORE = "engine core"  # vLLM's engine core and workers: the model itself
RUNNING_METHOD = re.compile(r"\.[a-z_]+$")
RAY_SYSTEM = ("raylet", "gcs_server", "dashboard", "ServeController", "log_monitor", "runtime_env")


def stage_of(title: str) -> str | None:
    """The stage a process serves, from its name and command line; None for processes of no stack."""
    if "VLLM::" in title or "EngineCore" in title:
        return ENGINE_CORE
    if "haproxy" in title or "ProxyActor" in title:
        return "proxy"
    if "ServeReplica:" in title:
        deployment = title.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]
        deployment = RUNNING_METHOD.sub("", deployment)  # Ray titles a replica `<name>.<method>` while it runs one
        if deployment.startswith("engine-") or deployment.startswith("LLMServer") or "LLMServer" in title:
            return "engine replica"
        return deployment.lower()
    if "vllm.entrypoints.openai.api_server" in title:
        return "api server"
    if any(name in title for name in RAY_SYSTEM):
        return "ray system"
    return None


@dataclass
class StageUsage:
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0


@dataclass
class ProcessSampler:
    """Samples every process's CPU times and memory in a thread; stop() gives the usage per stage."""

    interval_s: float = 0.5
    within: int | None = None  # only this process's descendants (one of several stacks on the machine)
    exclude: tuple[int, ...] = ()  # else every process but these and their descendants (stacks not under load)
    _baseline: dict[int, float] = field(default_factory=dict)
    _latest: dict[int, tuple[str, float]] = field(default_factory=dict)
    _peak_rss: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> dict[int, tuple[str, float, int]]:
        import psutil

        seen: dict[int, tuple[str, float, int]] = {}
        for process in self._candidates():
            try:
                title = " ".join([process.name(), *process.cmdline()])
                stage = stage_of(title)
                if stage is None:
                    continue
                times = process.cpu_times()
                seen[process.pid] = (stage, times.user + times.system, process.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return seen

    def _candidates(self) -> list[Any]:
        import psutil

        if self.within is not None:
            return descendants(self.within)
        skipped = {process.pid for root in self.exclude for process in descendants(root, including_root=True)}
        return [process for process in psutil.process_iter() if process.pid not in skipped]

    def _record(self, seen: dict[int, tuple[str, float, int]]) -> None:
        rss: dict[str, int] = defaultdict(int)
        for pid, (stage, cpu, resident) in seen.items():
            self._latest[pid] = (stage, cpu)
            rss[stage] += resident
        for stage, total in rss.items():
            self._peak_rss[stage] = max(self._peak_rss[stage], total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record(self._sample())

    def __enter__(self) -> ProcessSampler:
        first = self._sample()
        self._baseline = {pid: cpu for pid, (_, cpu, _) in first.items()}
        self._record(first)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._record(self._sample())

    def usage(self) -> dict[str, StageUsage]:
        stages: dict[str, StageUsage] = defaultdict(StageUsage)
        for pid, (stage, cpu) in self._latest.items():
            stages[stage].cpu_s += max(cpu - self._baseline.get(pid, 0.0), 0.0)
        for stage, peak in self._peak_rss.items():
            stages[stage].peak_rss_bytes = peak
        return dict(stages)


def descendants(root: int, including_root: bool = False) -> list[Any]:
    import psutil

    try:
        process = psutil.Process(root)
        return [process, *process.children(recursive=True)] if including_root else process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def per_thousand_requests(usage: dict[str, StageUsage], requests: int) -> dict[str, dict[str, float]]:
    """CPU seconds per 1,000 requests and peak RSS (MiB) per stage, plus the total outside the engine core."""
    scale = 1000 / max(requests, 1)
    figures = {
        stage: {"cpu_s_per_1k": round(u.cpu_s * scale, 2), "peak_rss_mib": round(u.peak_rss_bytes / 2**20)}
        for stage, u in sorted(usage.items())
    }
    outside = sum(u.cpu_s for stage, u in usage.items() if stage != ENGINE_CORE)
    figures["outside engine core"] = {"cpu_s_per_1k": round(outside * scale, 2), "peak_rss_mib": 0}
    return figures


def measured(run: Any, requests_of: Any, within: int | None = None, exclude: tuple[int, ...] = ()) -> Any:
    """run() under a sampler; its result gains `processes`: per-stage CPU per 1,000 requests and RSS."""
    with ProcessSampler(within=within, exclude=exclude) as sampler:
        result = run()
    result["processes"] = per_thousand_requests(sampler.usage(), requests_of(result))
    return result
