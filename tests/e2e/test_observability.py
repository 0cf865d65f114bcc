"""Metrics move by the right amounts; request ids run through every stage's JSON logs."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from servegraph.graphs.local_cluster import ROOT
from tests.e2e.conftest import Graph, poll

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def scrape(graph: Graph) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for line in httpx.get(graph.metrics_url, timeout=10).text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            samples[(match["name"], labels)] = float(match["value"])
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (metric, tags), value in samples.items() if metric == name and wanted <= tags)


def growth(before: dict, after: dict, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def settled_scrape(graph: Graph) -> dict:
    """A scrape whose servegraph series equal those of the previous poll, two report intervals earlier."""
    previous: dict | None = None  # never "stable" on the first read

    def settled() -> dict | None:
        nonlocal previous
        samples = scrape(graph)
        ours = {key: value for key, value in samples.items() if key[0].startswith("ray_servegraph_")}
        stable, previous = ours == previous, ours
        return samples if stable else None

    return poll(settled, 60, "earlier requests' metrics to settle", interval_s=2.5)


def test_request_and_token_counters_move_by_what_was_served(client, graph):
    before = settled_scrape(graph)
    list(client.completions.create(model="tiny", prompt="stream me", max_tokens=4, stream=True))
    n, max_tokens = 3, 7
    prompt_tokens = 0
    for _ in range(n):
        response = client.completions.create(
            model="small", prompt="count me", max_tokens=max_tokens, extra_body={"ignore_eos": True}
        )
        prompt_tokens += response.usage.prompt_tokens
    for _ in range(2):
        httpx.post(f"{graph.openai_base_url}/completions", json={"model": "small", "prompt": "x", "max_tokens": 0})

    ok = {"model": "small", "application": "llm", "version": "v1", "tenant": "default"}
    expected = [
        ("ray_servegraph_requests_total", {"status": "200", **ok}, n),
        ("ray_servegraph_completion_tokens_total", ok, n * max_tokens),
        ("ray_servegraph_prompt_tokens_total", ok, prompt_tokens),
        ("ray_servegraph_e2e_latency_seconds_count", ok, n),
        ("ray_servegraph_engine_time_seconds_count", ok, n),
        ("ray_servegraph_graph_time_seconds_count", ok, n),
        ("ray_servegraph_requests_total", {"status": "400", "application": "llm"}, 2),
        ("ray_servegraph_ttft_seconds_count", {"model": "tiny"}, 1),
    ]
    engine_series = {"ray_vllm_kv_cache_usage_perc", "ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting"}

    def all_exported() -> dict | None:
        after = scrape(graph)
        reached = all(growth(before, after, name, **labels) >= want for name, labels, want in expected)
        return after if reached and engine_series <= {name for name, _ in after} else None

    after = poll(all_exported, 60, "our counters and vLLM's engine gauges to reach the exporter", interval_s=1)
    assert [growth(before, after, name, **labels) for name, labels, _ in expected] == [want for *_, want in expected]

    dashboard = json.loads((ROOT / "graphs" / "grafana-dashboard.json").read_text())
    queried = {
        m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"\bray_\w+", t["expr"])
    }
    exported = {name for name, _ in after}
    assert queried - exported == set(), "the dashboard queries series nobody exports"


def test_request_id_is_returned_and_joins_the_ingress_and_engine_lines(graph):
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    response = httpx.post(
        f"{graph.openai_base_url}/completions",
        json={"model": "tiny", "prompt": "follow me", "max_tokens": 3},
        headers={"X-Request-Id": request_id},
        timeout=30,
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == request_id

    # The inner stages write no per-call line of Serve's (see stage_process.drop_serve_access_lines):
    # the ingress's `request finished` line is the access log, and the engine's joins vLLM's id.
    stages = {"ingress", "engine-tiny-v1"}

    def lines_by_deployment() -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        for path in (graph.logs_dir / "serve").glob("replica_llm_*.log"):
            deployment = path.stem.removeprefix("replica_llm_").rsplit("_", 1)[0]
            for line in path.read_text(errors="replace").splitlines():
                if request_id in line and line.startswith("{"):
                    found.setdefault(deployment, []).append(json.loads(line))
        return found

    def every_stage_logged() -> dict[str, list[dict]] | None:
        found = lines_by_deployment()
        return found if stages <= set(found) else None

    try:
        found = poll(every_stage_logged, 30, "every stage to log the request id")
    except TimeoutError:
        pytest.fail(f"only these stages logged {request_id}: {sorted(lines_by_deployment())}")
    access = [r for r in found["ingress"] if r.get("message") == "request finished"]
    assert len(access) == 1
    engine_lines = [r for r in found["engine-tiny-v1"] if r.get("message") == "engine request finished"]
    assert len(engine_lines) == 1 and engine_lines[0]["engine_request_id"], engine_lines
    # Serve's access line ("CALL <method> OK <ms>") is written as a call returns: the tokenizer's
    # before the ingress's line exists, the postprocess stream's as it ends.
    inner_calls = [
        (stage, line["message"])
        for stage in ("tokenizer", "postprocess", "engine-tiny-v1")
        for line in lines_by_deployment().get(stage, [])
        if re.search(r"\bCALL \S+ \S+ [\d.]+ms$", line.get("message", ""))
    ]
    assert inner_calls == []
    fields = access[0]["servegraph"]
    assert (fields["model"], fields["version"], fields["status"], fields["completion_tokens"]) == ("tiny", "v1", 200, 3)
    assert fields["latency_s"] >= fields["engine_s"] > 0
    assert "follow me" not in json.dumps(found)
