// The cluster panel: nodes, deployments (with scale and undeploy), replicas, proxies; the deploy form.
import { api, el, fmtAgo, fmtBytes, fmtDuration, syncOptions, syncRows } from "./util.js";

const $ = (id) => document.getElementById(id);

function cpus(n) { return Number.isInteger(n) ? String(n) : n.toFixed(1); }

function nodeRows(nodes, now) {
  return nodes.map((n) => ({
    key: n.node_id,
    className: n.alive ? "" : "bad",
    cells: [
      n.node_id, n.address || n.hostname,
      { text: n.alive ? "READY" : "DEAD", className: "state " + (n.alive ? "READY" : "DEAD") },
      `${cpus(n.allocated.cpus)} / ${cpus(n.capacity.cpus)}`,
      `${n.cpu_percent.toFixed(0)}%`,
      `${fmtBytes(n.available.memory_bytes)} / ${fmtBytes(n.capacity.memory_bytes)}`,
      `${cpus(n.allocated.gpus)} / ${cpus(n.capacity.gpus)}`,
      fmtAgo(n.last_seen, now),
    ],
  }));
}

function replicaRows(replicas, now, onLogs) {
  return replicas.map((r) => {
    const i = r.info;
    const bad = r.state === "FAILED" || r.state === "UNHEALTHY";
    return {
      key: r.replica_id,
      className: bad ? "bad" : "",
      cells: [
        r.replica_id, r.model, { text: r.state, className: "state " + r.state }, r.node_id, String(r.restarts),
        fmtAgo(r.since, now), i ? fmtBytes(i.rss_bytes) : "–", i ? String(i.running) : "–",
        i ? String(i.waiting) : "–", i ? i.tokens_per_second.toFixed(1) : "–",
        i ? `${i.seconds_since_step.toFixed(1)}s` : "–",
        { text: r.message, className: "wrap" },
        { make: (td) => td.append(el("button", { type: "button", className: "logs-button",
                                                  onclick: () => onLogs(r.replica_id) }, "Logs")) },
      ],
    };
  });
}

export class ClusterPanel {
  constructor({ onLogs, status }) {
    this.onLogs = onLogs;
    this.status = status; // (text, ok) for the action status line
    this.data = null;
    $("deploy-form").addEventListener("submit", (e) => { e.preventDefault(); this.deploy(); });
  }

  render(data) {
    this.data = data;
    const now = data.now;
    $("cluster-error").hidden = data.head_up;
    if (!data.head_up) $("cluster-error").textContent = "the head does not answer: showing nothing until it does";
    syncRows($("nodes").tBodies[0], nodeRows(data.nodes, now));
    syncRows($("deployments").tBodies[0], data.deployments.map((d) => this.deploymentRow(d)));
    syncRows($("replicas").tBodies[0], replicaRows(data.replicas, now, this.onLogs));
    const me = data.proxy;
    const proxies = data.proxies.length ? data.proxies : [{ address: location.host, pid: me.pid, restarts: 0, this: true }];
    syncRows($("proxies").tBodies[0], proxies.map((p) => ({
      key: `${p.address}/${p.pid}`,
      className: p.pid ? "" : "bad",
      cells: [p.address || "–", p.pid ? String(p.pid) : "not running", String(p.restarts),
              p.this ? (me.head_connected ? "connected" : "disconnected") : "–",
              p.this ? String(me.routes_version) : "–", p.this ? fmtDuration(me.uptime_s) : "–"],
    })));
  }

  deploymentRow(d) {
    return {
      key: d.model,
      className: d.ready < d.replicas ? "short" : "",
      cells: [
        d.model, { text: `${d.ready}/${d.replicas}`, className: "ready-count" }, d.node || "any node",
        { text: scalingText(d.autoscaling), className: "wrap" },
        { text: d.message, className: "wrap" },
        { make: (td) => {
            const input = el("input", { type: "number", min: 0, max: 64, value: d.replicas, className: "scale-input",
                                        title: "replicas" });
            input.setAttribute("aria-label", `replicas of ${d.model}`);
            td.append(input,
              el("button", { type: "button", className: "scale-button",
                             onclick: () => this.act("scale", { model: d.model, replicas: Number(input.value) }) },
                 "Scale"),
              el("button", { type: "button", className: "undeploy-button",
                             onclick: (e) => this.undeploy(e.target, d.model) }, "Undeploy"));
          } },
      ],
    };
  }

  undeploy(button, model) {
    if (button.dataset.armed) { this.act("undeploy", { model }); return; }
    button.dataset.armed = "1";
    button.textContent = "Confirm undeploy";
    setTimeout(() => { delete button.dataset.armed; button.textContent = "Undeploy"; }, 4000);
  }

  deploy() {
    const node = $("deploy-node").value.trim();
    this.act("deploy", { model: $("deploy-model").value, replicas: Number($("deploy-replicas").value), node });
  }

  async act(action, body) {
    this.status(`${action} ${body.model} …`, true);
    try {
      const res = await api(`/dashboard/api/admin/${action}`, { admin: true, body });
      this.status(`${action}: ${res.message}`, true);
    } catch (e) {
      this.status(`${action} refused (${e.status || "network"}): ${e.message}`, false);
    }
  }

  async loadCatalog() {
    try {
      const { models } = await api("/dashboard/api/catalog");
      const names = models.map((m) => m.name);
      const fresh = !$("deploy-model").options.length;
      syncOptions($("deploy-model"), names);
      const preferred = models.find((m) => m.is_default && !m.deployed) || models.find((m) => !m.deployed);
      if (fresh && preferred) $("deploy-model").value = preferred.name;
      $("deploy-model").title = models.map((m) => `${m.name}: ${m.description || ""}`).join("\n");
    } catch (e) {
      this.status(`cannot list the catalog: ${e.message}`, false);
    }
  }
}

// An autoscaled deployment's range, target, load and last decision; "fixed" for a fixed count.
function scalingText(a) {
  if (!a) return "fixed";
  const last = a.last_decision ? `; last: ${a.last_decision}` : "";
  return `${a.min}–${a.max}, target ${a.target} per replica, load ${a.load.toFixed(1)}${last}`;
}
