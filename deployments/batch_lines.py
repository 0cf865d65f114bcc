"""A batch's lines: read from its input file, checked, and their results appended as OpenAI writes them.

Input lines are OpenAI's request input objects, `{"custom_id", "method", "url", "body"}`, one per
line. Each is parsed once here (the body then goes on as the client's body does on the
interactive path, parsed again only by the tokenizer stage's vLLM models). A line that is not
such an object is reported in the error file and the rest run (OpenAI would fail the whole
batch at validation; a malformed line here costs only itself).

Result lines carry an id made from the batch id and the input line's number, so the result
files say by themselves which lines are done: a runner that restarts reads them back, skips
those lines and runs the others, and every line ends up in exactly one result line.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servegraph.deployments.errors import OpenAIError
from servegraph.deployments.protocol import ClientRequest, RequestKind
from servegraph.deployments.request_limits import check_limits, parse_body
from servegraph.models.config import RequestLimits

# The endpoints a batch may name, and the kind of request each line then is.
BATCH_ENDPOINTS: dict[str, RequestKind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/responses": "responses",
    "/v1/embeddings": "embedding",
}
# Codes of lines that never ran: rebuilt into the batch's `errors` list when a runner resumes.
MALFORMED_CODES = frozenset(
    {"invalid_json_line", "missing_required_parameter", "duplicate_custom_id", "invalid_url", "invalid_method"}
)
EXPIRED = ("batch_expired", "This request could not be executed before the completion window expired.")
CANCELLED = ("batch_cancelled", "The batch was cancelled before this request executed.")
MAX_LISTED_ERRORS = 1000  # malformed lines named in the batch's `errors` (all of them are in the error file)


def line_id(batch_id: str, number: int) -> str:
    """A result line's id: opaque to clients, but the runner reads the input line's number back from it."""
    return f"batch_req_{batch_id[6:22]}{number:08x}"


def line_number(result_id: str) -> int:
    return int(result_id[-8:], 16)


@dataclass(frozen=True)
class LineError:
    """Why a line could not be run at all: OpenAI's BatchError fields."""

    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class InputLine:
    """One input line: a request to run, a request the API refuses (`refused`), or a malformed line (`error`)."""

    number: int
    custom_id: str | None
    request: ClientRequest | None = None
    refused: OpenAIError | None = None
    error: LineError | None = None


def parse_line(
    number: int, raw: bytes, endpoint: str, seen: set[str], limits: RequestLimits
) -> InputLine:  # fmt: skip
    """raw as a request of the batch's endpoint, or why not; seen collects the custom_ids met so far."""
    try:
        item = parse_body(raw)
    except OpenAIError as error:
        message = error.message.replace("The request body", "The line", 1)
        return InputLine(number, None, error=LineError("invalid_json_line", message))
    if not isinstance(item, dict):
        return InputLine(number, None, error=LineError("invalid_json_line", "A line must be a JSON object."))
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        message = "Each line needs a `custom_id`: a non-empty string."
        return InputLine(number, None, error=LineError("missing_required_parameter", message, "custom_id"))
    if custom_id in seen:
        message = f"The custom_id `{custom_id[:80]}` is used by an earlier line; each must be unique."
        return InputLine(number, custom_id, error=LineError("duplicate_custom_id", message, "custom_id"))
    seen.add(custom_id)
    if item.get("method") != "POST":
        message = f"The line's method is {item.get('method')!r}; the Batch API runs POST requests only."
        return InputLine(number, custom_id, error=LineError("invalid_method", message, "method"))
    if item.get("url") != endpoint:
        message = f"The line's url {item.get('url')!r} is not the batch's endpoint `{endpoint}`."
        return InputLine(number, custom_id, error=LineError("invalid_url", message, "url"))
    body = item.get("body")
    if not isinstance(body, dict):
        message = "Each line needs a `body`: the request as a JSON object."
        return InputLine(number, custom_id, error=LineError("missing_required_parameter", message, "body"))
    try:
        if body.get("stream"):
            raise OpenAIError("`stream` is not supported in a batch: results are written whole.", param="stream")
        check_limits(body, limits)
        inputs = body.get("input")
        if BATCH_ENDPOINTS[endpoint] == "embedding" and isinstance(inputs, list) and len(inputs) > limits.max_prompts:
            raise OpenAIError(f"input: {len(inputs)} inputs is over this server's limit of {limits.max_prompts}.",
                              param="input")  # fmt: skip
        return InputLine(number, custom_id, request=ClientRequest.of(BATCH_ENDPOINTS[endpoint], body))
    except OpenAIError as error:
        return InputLine(number, custom_id, refused=error)


def input_lines(path: Path, endpoint: str, limits: RequestLimits) -> Iterator[InputLine]:
    """Every non-blank line of the input file, in order, numbered from 1 as the file's lines are."""
    seen: set[str] = set()
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if raw.strip():
                yield parse_line(number, raw, endpoint, seen, limits)


def count_lines(path: Path) -> int:
    with open(path, "rb") as file:
        return sum(1 for raw in file if raw.strip())


def success_line(result_id: str, custom_id: str, request_id: str, status: int, body_json: str) -> bytes:
    """OpenAI's batch output line around a response body already in JSON (spliced in, never parsed again)."""
    if "\n" in body_json:  # only whitespace between tokens: a newline cannot sit inside a JSON string
        body_json = body_json.replace("\n", "")
    head = json.dumps({"id": result_id, "custom_id": custom_id})[:-1]
    response = f'{{"status_code": {status}, "request_id": {json.dumps(request_id)}, "body": {body_json}}}'
    return f'{head}, "response": {response}, "error": null}}\n'.encode()


def refused_line(result_id: str, custom_id: str | None, request_id: str, error: OpenAIError) -> bytes:
    """A request the API answered with an error status: OpenAI puts the status and error body in `response`."""
    return success_line(result_id, custom_id, request_id, error.status_code, json.dumps(error.body()))


def error_line(result_id: str, custom_id: str | None, code: str, message: str) -> bytes:
    """A line that never got a response (malformed, expired, cancelled): `response` null, `error` set."""
    line = {"id": result_id, "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}
    return (json.dumps(line) + "\n").encode()


@dataclass
class Progress:
    """What a batch's result files say: the input lines done, the counts and tokens, the malformed lines."""

    done: set[int] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def malformed(self, number: int, error: LineError) -> None:
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append({"code": error.code, "line": number, "message": error.message, "param": error.param})

    def succeeded(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.completed += 1
        self.input_tokens += prompt_tokens
        self.output_tokens += completion_tokens


class ResultFile:
    """An append-only JSON-lines file: each line written whole and fsynced before it counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def recover(self) -> list[dict[str, Any]]:
        """The complete lines written so far; a line torn by a crash (no newline yet) is cut off."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            os.truncate(self.path, len(complete))
        return [json.loads(line) for line in complete.splitlines() if line]

    def append(self, line: bytes) -> None:
        """Blocking (write and fsync): run it off the event loop."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def recover_progress(output: ResultFile, errors: ResultFile) -> Progress:
    """The progress the result files record (read once, when a runner takes a batch up)."""
    progress = Progress()
    for line in output.recover():
        progress.done.add(line_number(line["id"]))
        usage = (line.get("response") or {}).get("body", {}).get("usage") or {}
        prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))  # chat/completions, or responses
        progress.succeeded(prompt, usage.get("completion_tokens", usage.get("output_tokens", 0)))
    for line in errors.recover():
        number = line_number(line["id"])
        progress.done.add(number)
        progress.failed += 1
        error = line.get("error") or {}
        if error.get("code") in MALFORMED_CODES:
            progress.malformed(number, LineError(error["code"], error.get("message", "")))
    return progress


class ResultWriter:
    """Appends a batch's result lines off the event loop, and counts each once it is durable.

    A line counts (in Progress) when its write has returned, even if the task that asked for
    it was cancelled in the meantime (cancel, expiry): `drain` waits for such writes, so no line
    is ever reported both done and unfinished.
    """

    def __init__(self, output: ResultFile, errors: ResultFile, progress: Progress, counted: Callable[[], None]):
        self.output, self.errors, self.progress = output, errors, progress
        self._counted = counted
        self._writes: set[asyncio.Task] = set()

    async def succeeded(self, number: int, line: bytes, prompt_tokens: int, completion_tokens: int) -> None:
        await self._write(self.output, line, number, lambda: self.progress.succeeded(prompt_tokens, completion_tokens))

    async def failed(self, number: int, line: bytes, malformed: LineError | None = None) -> None:
        def count() -> None:
            self.progress.failed += 1
            if malformed is not None:
                self.progress.malformed(number, malformed)

        await self._write(self.errors, line, number, count)

    async def _write(self, file: ResultFile, line: bytes, number: int, count: Callable[[], None]) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(file.append, line))
        self._writes.add(task)

        def written(done: asyncio.Task) -> None:  # runs before the shielded await below returns
            self._writes.discard(done)
            if not done.cancelled() and done.exception() is None:
                count()
                self.progress.done.add(number)
                self._counted()

        task.add_done_callback(written)
        await asyncio.shield(task)

    async def drain(self) -> None:
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def close(self) -> None:
        self.output.close()
        self.errors.close()
