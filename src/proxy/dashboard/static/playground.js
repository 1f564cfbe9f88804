// The chat playground: streams /v1/chat/completions into the conversation as text; Stop aborts the request,
// which the proxy passes on to the replica as a cancel.
import { creds, el, syncOptions } from "./util.js";

const $ = (id) => document.getElementById(id);

function message(role, text = "") {
  const body = el("div", { className: "text" }, text);
  const node = el("div", { className: `msg ${role}` }, el("div", { className: "role" }, role), body);
  $("pg-conversation").append(node);
  return body;
}

function scrollDown() {
  const c = $("pg-conversation");
  c.scrollTop = c.scrollHeight;
}

// Server-Sent Events of a fetch body: calls onData with each `data:` payload.
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) onData(data);
    }
  }
}

export class Playground {
  constructor() {
    this.history = [];   // {role, content} of the turns so far
    this.controller = null;
    $("pg-form").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    $("pg-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); this.send(); }
    });
    $("pg-stop").addEventListener("click", () => this.controller && this.controller.abort());
    $("pg-clear").addEventListener("click", () => {
      if (this.controller) this.controller.abort();
      this.history = [];
      $("pg-conversation").replaceChildren();
      $("pg-stats").textContent = "";
    });
  }

  setModels(models) {
    syncOptions($("pg-model"), models);
  }

  request(text) {
    const system = $("pg-system").value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...this.history,
                      { role: "user", content: text }];
    return { model: $("pg-model").value, messages, stream: true, stream_options: { include_usage: true },
             temperature: Number($("pg-temperature").value), max_tokens: Number($("pg-max-tokens").value) };
  }

  busy(on) {
    $("pg-send").disabled = on;
    $("pg-stop").disabled = !on;
  }

  async send() {
    const text = $("pg-input").value.trim();
    if (!text || this.controller) return;
    if (!$("pg-model").value) { $("pg-stats").textContent = "no model is deployed"; return; }
    const body = this.request(text);
    $("pg-input").value = "";
    message("user", text);
    const answer = message("assistant");
    const stats = { started: performance.now(), first: 0, chunks: 0, usage: null, finish: "", replica: "" };
    this.controller = new AbortController();
    this.busy(true);
    delete $("pg-stats").dataset.outcome;
    $("pg-stats").textContent = "waiting for the first token …";
    let outcome = "done";
    try {
      await this.stream(body, answer, stats);
    } catch (e) {
      if (e.name === "AbortError") outcome = "stopped";
      else { outcome = "error"; answer.parentNode.classList.add("error"); answer.textContent += (answer.textContent ? "\n" : "") + e.message; }
    } finally {
      this.controller = null;
      this.busy(false);
    }
    if (outcome !== "error") this.history.push({ role: "user", content: text }, { role: "assistant", content: answer.textContent });
    this.showStats(stats, outcome);
    scrollDown();
  }

  async stream(body, answer, stats) {
    const headers = { "Content-Type": "application/json" };
    if (creds.api) headers["Authorization"] = "Bearer " + creds.api;
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body),
                                                        signal: this.controller.signal });
    stats.replica = resp.headers.get("X-Replica-Id") || "";
    stats.requestId = resp.headers.get("X-Request-Id") || "";
    if (!resp.ok) {
      const err = await resp.json().catch(() => null);
      throw new Error(`HTTP ${resp.status}: ${(err && err.error && err.error.message) || resp.statusText}`);
    }
    await readEvents(resp.body, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
      if (chunk.usage) stats.usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.finish_reason) stats.finish = choice.finish_reason;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        if (!stats.first) stats.first = performance.now();
        stats.last = performance.now();
        stats.chunks += 1;
        answer.textContent += piece;
        scrollDown();
      }
    });
  }

  showStats(s, outcome) {
    const ttft = s.first ? `${(s.first - s.started).toFixed(0)} ms` : "–";
    const tokens = s.usage ? s.usage.completion_tokens : s.chunks;
    const seconds = s.first && s.last ? (s.last - s.first) / 1000 : 0;
    const rate = seconds > 0 && tokens > 1 ? `${((tokens - 1) / seconds).toFixed(1)} tokens/s` : "–";
    const finish = outcome === "done" ? (s.finish || "done") : outcome;
    $("pg-stats").textContent = `TTFT ${ttft} · ${rate} · ${tokens} tokens · replica ${s.replica || "–"} · ${finish}`;
    $("pg-stats").dataset.replica = s.replica;
    $("pg-stats").dataset.outcome = outcome;
    $("pg-stats").dataset.requestId = s.requestId || "";
  }
}
