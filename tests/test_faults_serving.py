"""Serving under faults: ``benchmarks/serve_faults.py`` at a small scale, asserted.

The service (two model replicas) runs in one process, the retrying client in another, on
loopback; a third of the requests are bad in every way the benchmark knows (a body over the limit
on every POST route among them), and one model replica is killed with SIGKILL midway.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from jin_orchestrate.serving.client import EmbeddingClient, RequestFailed, RetryPolicy

pytestmark = pytest.mark.fault

ROOT = Path(__file__).parents[1]


def test_a_replica_killed_under_a_mix_of_good_and_bad_requests(tmp_path):
    out = tmp_path / "serve_faults.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/serve_faults.py"),
            "--requests",
            "600",
            "--deadline-s",
            "300",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["replicas_killed"] == 1 and s["hung"] == 0 and s["finished"] == 600
    assert s["bad_5xx"] == 0 and s["bad_4xx"] == s["bad"] > 0
    # Every good request answered, or failed cleanly after the client's retries.
    assert s["good_answered"] + s["good_failed_cleanly"] == s["good"] > 0
    assert s["good_other"] == 0
    assert s["replica_restarted"] == 1 and s["healthz_after"] == 200
    assert s["answered_after_restart"] == 32
    # Over-limit bodies are refused on every POST route the app documents.
    oversize = {k: v for k, v in s["by_kind"].items() if k.startswith("oversize_body:")}
    assert sorted(oversize) == ["oversize_body:/v1/embed", "oversize_body:/v1/similarity"]
    assert all(set(v) == {"413"} for v in oversize.values())
    assert set(s["by_kind"]["too_many_items"]) == {"413"}


def _mock(statuses: list[int | None]) -> tuple[httpx.MockTransport, list[int]]:
    """A server answering ``statuses`` in turn (``None``: the connection fails)."""
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        status = statuses[min(len(calls) - 1, len(statuses) - 1)]
        if status is None:
            raise httpx.ConnectError("refused", request=request)
        data = {"data": [{"embedding": [1.0]}]} if status == 200 else {"detail": []}
        return httpx.Response(status, json=data, headers={"retry-after": "0"})

    return httpx.MockTransport(answer), calls


@pytest.mark.parametrize(
    ("statuses", "attempts", "final"),
    [
        ([503, None, 502, 200], 4, 200),  # lost replica, refused connection, bad gateway: retried
        ([422, 200], 1, 422),  # the client's mistake: never retried
        ([500, 200], 1, 500),  # a server bug: not hidden by retries
        ([503], 3, 503),  # still unavailable after every attempt: a clean failure
    ],
)
def test_the_client_retries_only_what_a_retry_can_fix(statuses, attempts, final):
    transport, calls = _mock(statuses)
    policy = RetryPolicy(attempts=3 if final == 503 else 6, backoff_s=0.0, seed=0)
    with EmbeddingClient("http://jin.test", policy, transport=transport) as client:
        answer = client.post("/v1/embed", {"items": [{"modality": "text", "data": "x"}]})
    assert (answer.attempts, answer.response.status_code, len(calls)) == (attempts, final, attempts)


def test_the_client_names_a_request_that_never_got_an_answer():
    transport, calls = _mock([None])
    policy = RetryPolicy(attempts=2, backoff_s=0.0)
    client = EmbeddingClient("http://jin.test", policy, transport=transport)
    with pytest.raises(RequestFailed, match="no answer after 2 attempts") as info:
        client.embed([{"modality": "text", "data": "x"}])
    client.close()
    assert info.value.status is None and len(calls) == 2
