"""Concurrent streaming clients for chaos tests: native text streams and OpenAI SSE streams of greedy chats,
each outcome kept with its text so a test can count failures and check that every completed text is whole."""
from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import openai

from support.cluster import ClientThreads, Cluster

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten year old.",
    "Describe a walk through a forest in autumn.",
    "What are three good habits for writing clean code?",
]


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@dataclass
class Outcome:
    """One client request: how it went over the wire, what text arrived and when it ended."""
    client: str          # "native" or "openai"
    prompt: str
    ok: bool             # a normal end: 200 and a finished stream
    text: str
    error: str
    started: float
    ended: float


class StreamLoad(ClientThreads):
    """`streams` threads, each sending greedy streaming chats one after another until the block ends.
    Even threads use the native text stream, odd ones the `openai` package with SSE; `results` holds
    an Outcome per request."""
    failure_pause_s = 0.2
    wait_timeout_s = 180.0

    def __init__(self, cluster: Cluster, model: str, max_tokens: int, streams: int = 4, timeout: float = 120):
        super().__init__(threads=streams, join_s=timeout + 30)
        self.cluster, self.model, self.max_tokens = cluster, model, max_tokens
        self.streams, self.timeout = streams, timeout

    def failures(self) -> list[Outcome]:
        return [o for o in self.results if not o.ok]

    def send(self, thread: int, turn: int) -> tuple[bool, Outcome]:
        client, send = ("native", self._native) if thread % 2 == 0 else ("openai", self._openai)
        prompt = PROMPTS[(thread + turn) % len(PROMPTS)]
        started = time.monotonic()
        try:
            ok, text, error = send(prompt)
        except Exception as e:  # a closed connection, a timeout: the request failed
            ok, text, error = False, "", f"{type(e).__name__}: {e}"
        return ok, Outcome(client, prompt, ok, text, error, started, time.monotonic())

    def body(self, prompt: str, **extra) -> dict:
        return {"messages": messages(prompt), "max_tokens": self.max_tokens, "temperature": 0, **extra}

    def _native(self, prompt: str) -> tuple[bool, str, str]:
        url = urlsplit(self.cluster.url(f"/v1/chat/{self.model}"))
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=self.timeout)
        try:
            conn.request("POST", url.path, json.dumps(self.body(prompt)), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read().decode()  # raises IncompleteRead if the connection closes mid-body
        finally:
            conn.close()
        if resp.status != 200:
            return False, "", f"HTTP {resp.status}: {data}"
        text, sep, tail = data.partition('\n{"error"')
        return (False, text, sep.strip() + tail) if sep else (True, text, "")

    def _openai(self, prompt: str) -> tuple[bool, str, str]:
        with openai.OpenAI(base_url=self.cluster.url("/v1"), api_key="none", max_retries=0,
                           timeout=self.timeout) as client:
            stream = client.chat.completions.create(model=self.model, stream=True, **self.body(prompt))
            parts, finish = [], None
            for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
        text = "".join(parts)
        return (True, text, "") if finish else (False, text, "the SSE stream ended without a finish_reason")


class WatchedStream:
    """One native greedy chat stream read as it arrives: its headers, then its first text, so a test can
    break the replica it is known to be streaming from (`replica`) while it is mid-stream."""

    def __init__(self, cluster: Cluster, model: str, prompt: str, max_tokens: int, timeout: float = 120):
        url = urlsplit(cluster.url(f"/v1/chat/{model}"))
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
        body = {"messages": messages(prompt), "max_tokens": max_tokens, "temperature": 0}
        self.conn.request("POST", url.path, json.dumps(body), {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        self.replica = self.resp.getheader("X-Replica-Id", "")
        self.request_id = self.resp.getheader("X-Request-Id", "")
        self.first = self.resp.read1(65536)  # blocks until the first text has arrived

    def finish(self) -> tuple[bool, str, str]:
        """Reads to the end: (ended normally, the whole text, the error piece if it ended with one)."""
        try:
            data = (self.first + self.resp.read()).decode()
        finally:
            self.conn.close()
        text, sep, tail = data.partition('\n{"error"')
        return (False, text, sep.strip() + tail) if sep else (True, text, "")


def reference_texts(cluster: Cluster, model: str, max_tokens: int) -> dict[str, str]:
    """The no-failure greedy text of every prompt, one request at a time on a healthy cluster."""
    load = StreamLoad(cluster, model, max_tokens)
    out = {}
    for prompt in PROMPTS:
        ok, text, error = load._native(prompt)
        assert ok and text, f"reference request failed: {error}"
        out[prompt] = text
    return out
