// Shared helpers: credentials, calls to /dashboard/api, DOM building (text only, never HTML), formatting.

const STORE = window.sessionStorage;
export const creds = {
  get api() { return STORE.getItem("gridserve.apiKey") || ""; },
  get admin() { return STORE.getItem("gridserve.adminKey") || ""; },
  save(api, admin) {
    api ? STORE.setItem("gridserve.apiKey", api) : STORE.removeItem("gridserve.apiKey");
    admin ? STORE.setItem("gridserve.adminKey", admin) : STORE.removeItem("gridserve.adminKey");
  },
};

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// Reads carry the API key (or, lacking one, the admin key); actions carry the admin key, the custom
// X-Gridserve-Admin header and a JSON body, which a cross-site form cannot send.
export async function api(path, { admin = false, body = undefined } = {}) {
  const headers = {};
  const key = admin ? creds.admin : (creds.api || creds.admin);
  if (key) headers["Authorization"] = "Bearer " + key;
  const init = { method: "GET", headers, cache: "no-store" };
  if (admin) {
    headers["X-Gridserve-Admin"] = "1";
    headers["Content-Type"] = "application/json";
    init.method = "POST";
    init.body = JSON.stringify(body || {});
  }
  const resp = await fetch(path, init);
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    throw new ApiError(resp.status, (data && data.error && data.error.message) || `HTTP ${resp.status}`);
  }
  return data;
}

// el("td", {className: "x"}, "text", otherNode): children are text or nodes; no markup is ever parsed.
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// Rows keyed by `key`, updated in place so inputs inside them keep focus and value across refreshes.
// Each cell is a string (its text) or {make(td)} (built once) or {text, className}.
export function syncRows(tbody, rows) {
  const existing = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
  rows.forEach((row, i) => {
    let tr = existing.get(row.key);
    if (!tr) {
      tr = el("tr", { dataset: { key: row.key } });
      row.cells.forEach(() => tr.append(el("td")));
    }
    existing.delete(row.key);
    tr.className = row.className || "";
    row.cells.forEach((cell, j) => {
      const td = tr.children[j];
      if (cell && typeof cell === "object" && cell.make) {
        if (!td.dataset.made) { cell.make(td); td.dataset.made = "1"; }
        if (cell.update) cell.update(td);
        return;
      }
      const text = cell && typeof cell === "object" ? cell.text : String(cell ?? "");
      setText(td, text);
      td.className = (cell && typeof cell === "object" && cell.className) || "";
    });
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
  });
  for (const tr of existing.values()) tr.remove();
}

export function fmtBytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export function fmtAgo(unixSeconds, now) {
  if (!unixSeconds) return "–";
  const s = Math.max(0, (now ?? Date.now() / 1000) - unixSeconds);
  if (s < 60) return `${s.toFixed(0)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export function fmtDuration(s) {
  if (s < 60) return `${s.toFixed(0)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

// Keeps a <select>'s options equal to `values` (strings), keeping the current choice when it is still there.
export function syncOptions(select, values, labels = {}) {
  const current = select.value;
  const have = [...select.options].map((o) => o.value);
  if (have.length === values.length && have.every((v, i) => v === values[i])) return;
  select.replaceChildren(...values.map((v) => el("option", { value: v }, labels[v] || v)));
  if (values.includes(current)) select.value = current;
}
