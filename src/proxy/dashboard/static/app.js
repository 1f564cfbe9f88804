// The dashboard page: credentials, the refresh loops (cluster every second, charts every two) and the panels.
import { api, creds } from "./util.js";
import { ClusterPanel } from "./cluster.js";
import { Charts } from "./charts.js";
import { Playground } from "./playground.js";
import { LogPanel } from "./logs.js";

const $ = (id) => document.getElementById(id);
const CLUSTER_EVERY_MS = 1000;
const HISTORY_EVERY_MS = 2000;

function connection(text, ok) {
  const pill = $("conn");
  pill.textContent = text;
  pill.className = "pill " + (ok ? "ok" : "bad");
}

function actionStatus(text, ok) {
  const s = $("action-status");
  s.textContent = text;
  s.className = ok ? "note" : "error";
}

function setupCredentials(config) {
  $("api-key").value = creds.api;
  $("admin-key").value = creds.admin;
  const hints = [];
  hints.push(config.api_keys_required ? "This proxy needs an API key for every view and for chat."
                                      : "This proxy has no API keys: views and chat are open.");
  hints.push(config.actions_enabled ? "Actions need the admin key."
                                    : "Actions are off: the head was started without --admin-key-file.");
  $("creds-hint").textContent = hints.join(" ");
  $("creds-toggle").addEventListener("click", () => { $("creds").hidden = !$("creds").hidden; });
  $("creds-form").addEventListener("submit", (e) => {
    e.preventDefault();
    creds.save($("api-key").value.trim(), $("admin-key").value.trim());
    $("creds").hidden = true;
    refreshAll();
  });
  $("creds-forget").addEventListener("click", () => {
    creds.save("", "");
    $("api-key").value = $("admin-key").value = "";
  });
  if (config.api_keys_required && !creds.api && !creds.admin) $("creds").hidden = false;
}

let cluster, charts, playground, logs;

// Runs `fn` every `ms`, never two at once.
function every(ms, fn) {
  let running = false;
  const tick = async () => {
    if (running) return;
    running = true;
    try { await fn(); } finally { running = false; }
  };
  tick();
  setInterval(tick, ms);
}

async function refreshCluster() {
  try {
    const data = await api("/dashboard/api/cluster");
    cluster.render(data);
    const ready = data.deployments.filter((d) => d.ready > 0).map((d) => d.model);
    playground.setModels(ready.length ? ready : data.deployments.map((d) => d.model));
    logs.setReplicas(data.replicas.map((r) => r.replica_id));
    const age = Math.max(0, data.now - data.polled_at);
    connection(data.head_up ? `live · polled ${age.toFixed(1)}s ago` : "the head does not answer", data.head_up);
  } catch (e) {
    connection(e.status === 401 ? "needs a key: see Credentials" : `cannot reach the proxy: ${e.message}`, false);
    if (e.status === 401) $("creds").hidden = false;
  }
}

async function refreshHistory() {
  try {
    charts.render(await api("/dashboard/api/history"));
    $("charts-error").hidden = true;
  } catch (e) {
    $("charts-error").hidden = false;
    $("charts-error").textContent = `cannot draw the charts: ${e.message}`;
  }
}

function refreshAll() {
  refreshCluster();
  refreshHistory();
  cluster.loadCatalog();
}

async function main() {
  let config = { api_keys_required: false, actions_enabled: false };
  try {
    config = await api("/dashboard/api/config");
  } catch (e) {
    connection(`cannot reach the proxy: ${e.message}`, false);
  }
  setupCredentials(config);
  logs = new LogPanel();
  playground = new Playground();
  charts = new Charts();
  cluster = new ClusterPanel({
    status: actionStatus,
    onLogs: (replica) => { logs.follow(replica); $("logs").scrollIntoView({ behavior: "smooth" }); },
  });
  cluster.loadCatalog();
  every(CLUSTER_EVERY_MS, refreshCluster);
  every(HISTORY_EVERY_MS, refreshHistory);
}

main();
