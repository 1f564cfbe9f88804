// A replica's log, live: /dashboard/api/logs streams it as Server-Sent Events (read with fetch, so that the
// API key can go in a header); every line is shown as text.
import { creds, syncOptions } from "./util.js";

const $ = (id) => document.getElementById(id);
const MAX_LINES = 2000;

export class LogPanel {
  constructor() {
    this.controller = null;
    $("log-form").addEventListener("submit", (e) => { e.preventDefault(); this.follow($("log-replica").value); });
    $("log-stop").addEventListener("click", () => this.stop("stopped"));
  }

  setReplicas(ids) {
    syncOptions($("log-replica"), ids);
  }

  status(text) {
    $("log-status").textContent = text;
  }

  stop(why) {
    if (this.controller) this.controller.abort();
    this.controller = null;
    $("log-stop").disabled = true;
    if (why) this.status(why);
  }

  append(lines) {
    const out = $("log-output");
    const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    for (const line of lines) {
      const row = document.createElement("div");
      row.textContent = line;
      out.append(row);
    }
    while (out.childElementCount > MAX_LINES) out.firstElementChild.remove();
    if (atBottom) out.scrollTop = out.scrollHeight;
  }

  async follow(replica) {
    if (!replica) { this.status("pick a replica"); return; }
    this.stop();
    if ($("log-replica").value !== replica) {
      this.setReplicas([...new Set([...[...$("log-replica").options].map((o) => o.value), replica])]);
      $("log-replica").value = replica;
    }
    const controller = this.controller = new AbortController();
    $("log-output").replaceChildren();
    $("log-stop").disabled = false;
    this.status(`following ${replica} …`);
    const headers = {};
    const key = creds.api || creds.admin;
    if (key) headers["Authorization"] = "Bearer " + key;
    const tail = encodeURIComponent($("log-tail").value || "200");
    try {
      const resp = await fetch(`/dashboard/api/logs?replica=${encodeURIComponent(replica)}&tail=${tail}`,
                               { headers, signal: controller.signal, cache: "no-store" });
      if (!resp.ok) {
        const err = await resp.json().catch(() => null);
        throw new Error((err && err.error && err.error.message) || `HTTP ${resp.status}`);
      }
      await this.read(resp.body, replica);
    } catch (e) {
      if (e.name !== "AbortError") this.status(`${replica}: ${e.message}`);
    } finally {
      if (this.controller === controller) { this.controller = null; $("log-stop").disabled = true; }
    }
  }

  async read(body, replica) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      const blocks = buf.split("\n\n");
      buf = blocks.pop();
      const lines = [];
      for (const block of blocks) {
        let kind = "message", data = "";
        for (const l of block.split("\n")) {
          if (l.startsWith("event:")) kind = l.slice(6).trim();
          else if (l.startsWith("data:")) data += l.slice(5).trim();
        }
        const text = data ? JSON.parse(data) : "";
        if (kind === "line") lines.push(text);
        else if (kind === "error") this.status(`${replica}: the log stream broke: ${text}`);
        else if (kind === "end") this.status(`${replica}: ${text}`);
      }
      if (lines.length) this.append(lines);
    }
  }
}
