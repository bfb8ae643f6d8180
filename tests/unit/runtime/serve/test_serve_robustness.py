"""Robustness over real HTTP (issue 14): no request holds slots it cannot use, bodies and
prompts are bounded before work is done on them, and a bad request fails only itself."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from support.serving import make_config, metric_value
from kubeforge_runtime.serve.server import ServerThread
from kubeforge_runtime.serve.service import Admission

LONG = {"prompt": "hello", "max_tokens": 480, "temperature": 0, "ignore_eos": True}


def _wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _metric(server: ServerThread, name: str) -> float:
    return metric_value(httpx.get(server.base_url + "/metrics", timeout=10).text, name)


# --- admission: all of a request's choices at once, or none ---------------------------------
@pytest.fixture(scope="module")
def four_slots(start_server: Callable[..., ServerThread], tiny_model: Path) -> ServerThread:
    return start_server(make_config(tiny_model, name="four", maxConcurrentRequests=4))


def test_more_choices_than_slots_is_refused_at_once(four_slots: ServerThread) -> None:
    client = openai.OpenAI(base_url=four_slots.base_url + "/v1", api_key="x", max_retries=0, timeout=90)
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="four", prompt=["hello", "world"], n=16, max_tokens=1)
    assert time.monotonic() - start < 5
    message = err.value.body["message"]
    assert "32 choices" in message and "maxConcurrentRequests" in message and "lower n" in message
    assert _metric(four_slots, "vllm:num_requests_running") == 0  # it took nothing


def test_a_large_request_waiting_for_slots_holds_none(four_slots: ServerThread) -> None:
    """One slot busy; a request for all four waits holding none, so a one-token request sent
    after it is answered at once instead of queueing behind it."""
    url = four_slots.base_url + "/v1/completions"
    finished: dict[str, float] = {}
    results: dict[str, httpx.Response] = {}

    def post(name: str, body: dict) -> None:
        results[name] = httpx.post(url, json={"model": "four", **body}, timeout=120)
        finished[name] = time.monotonic()

    long_one = threading.Thread(target=post, args=("long", LONG))
    long_one.start()
    assert _wait_until(lambda: _metric(four_slots, "vllm:num_requests_running") == 1)
    large = threading.Thread(target=post, args=("large", {**LONG, "max_tokens": 8, "n": 4}))
    large.start()
    assert _wait_until(lambda: _metric(four_slots, "vllm:num_requests_waiting") >= 1)
    start = time.monotonic()
    post("small", {"prompt": "hi", "max_tokens": 1, "temperature": 0})
    small_seconds = time.monotonic() - start
    long_one.join(120)
    large.join(120)
    assert results["small"].status_code == 200, results["small"].text
    assert small_seconds < 5, small_seconds
    assert finished["small"] < finished["long"], "the small request waited behind the large one"
    assert results["large"].status_code == 200 and len(results["large"].json()["choices"]) == 4
    assert results["long"].status_code == 200


def test_a_large_request_is_not_starved_by_small_ones() -> None:
    """Past the backfill window nobody passes the head of the line, so freed slots gather for it."""

    async def scenario() -> list[str]:
        admission = Admission(max_running=2, max_waiting=8, backfill_seconds=0.05)
        order: list[str] = []
        await admission.acquire(1, 1)  # one slot busy
        large = asyncio.create_task(admission.acquire(2, 5))
        await asyncio.sleep(0)
        await admission.acquire(1, 1)  # young head: a small one may pass it
        order.append("small-1")
        await asyncio.sleep(0.1)  # the head is now past its backfill window
        small = asyncio.create_task(admission.acquire(1, 5))
        admission.release(1, 0.1)  # a slot frees: the small one must not take it
        await asyncio.sleep(0)
        assert not small.done() and not large.done()
        admission.release(1, 0.1)
        await large
        order.append("large")
        admission.release(2, 0.1)
        await small
        order.append("small-2")
        return order

    assert asyncio.run(scenario()) == ["small-1", "large", "small-2"]
