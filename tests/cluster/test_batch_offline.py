"""`servegraph batch --offline`: a Parquet file through Ray Data's vLLM processor on the default graph's `tiny`.

Its own Ray cluster, in a process of its own (the command's), before tests/e2e starts the
session's graph: the offline engine and the session's would not fit in memory together.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]

# Eight-token prompts at least: 1-4 token bfloat16 prompts crash vLLM's CPU worker on AMX CPUs.
PROMPT = "one two three four five six seven eight nine ten"
ROWS = [
    {"custom_id": "short", "body": {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}},
    {"custom_id": "long", "body": {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}},
    {"custom_id": "again", "body": {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}},
    *({"custom_id": f"row-{i}", "body": {"prompt": f"{PROMPT} {i} {i} {i}", "max_tokens": 6, "ignore_eos": True}}
      for i in range(5)),
]  # fmt: skip
TIMEOUT_S = 900


def run_offline(input_path: Path, output: Path) -> subprocess.CompletedProcess:
    """The command as a user runs it; on a timeout its whole process group (its Ray cluster too) is killed."""
    command = [sys.executable, "-m", "servegraph.graphs.cli", "batch", str(input_path), "--offline",
               "--endpoint", "/v1/completions", "--output", str(output), "--batch-size", "4"]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_memory_usage_threshold": "0.99"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"servegraph batch --offline did not finish in {TIMEOUT_S} s: {stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_a_parquet_file_runs_offline_with_every_row_once_and_greedy_outputs_consistent(tmp_path):
    input_path = tmp_path / "requests.parquet"
    table = pa.Table.from_pylist([{"custom_id": r["custom_id"], "body": json.dumps(r["body"])} for r in ROWS])
    pq.write_table(table, input_path)
    output = tmp_path / "results.parquet"

    done = run_offline(input_path, output)

    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(ROWS)} rows written to {output}" in done.stdout
    rows = pq.read_table(output).to_pylist()
    by_id = {row["custom_id"]: row for row in rows}
    assert sorted(by_id) == sorted(r["custom_id"] for r in ROWS) and len(rows) == len(ROWS)  # each row exactly once
    for row in ROWS:
        assert by_id[row["custom_id"]]["num_generated_tokens"] == row["body"]["max_tokens"]
        assert by_id[row["custom_id"]]["num_input_tokens"] >= 8
    # Greedy: the same request gives the same tokens, and four tokens are the start of twelve.
    assert by_id["again"]["generated_tokens"] == by_id["long"]["generated_tokens"]
    assert by_id["long"]["generated_tokens"][:4] == by_id["short"]["generated_tokens"]
    assert by_id["long"]["generated_text"] == by_id["again"]["generated_text"] != ""
