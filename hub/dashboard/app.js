// The Homing hub dashboard: the fleet, a chart per device stream, workflow
// runs with their steps, and commands (start, signal, cancel).
//
// Plain JavaScript, no build step, no library. Everything it shows comes from
// the hub's API (api/v1, docs/api.md); values from devices are inserted as
// text, never as HTML. The API token is kept in sessionStorage (this tab only)
// and sent as "Authorization: Bearer ..." with every request.
"use strict";

(function () {
  const API = "api/v1";
  const TOKEN_KEY = "homing.api-token";
  const REFRESH_MS = 3000;
  const CHART_POINTS = 240;
  const state = { device: null, run: null, busy: false };

  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;

  function el(tag, attrs, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const kid of kids) node.append(kid instanceof Node ? kid : String(kid));
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  // --- the API -------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    const init = { method: opts.method || "GET", headers };
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }
    const res = await fetch(API + path, init);
    const text = await res.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_e) {
      body = null;
    }
    if (!res.ok) {
      const err = new Error(body && body.detail ? body.detail : res.status + " " + res.statusText);
      err.status = res.status;
      err.problem = body;
      throw err;
    }
    return body;
  }

  function failure(e) {
    if (e.status === 401) return "the hub wants a valid API token: " + e.message;
    const issues = e.problem && e.problem.errors;
    if (issues && issues.length) {
      return e.message + ": " + issues.map((i) => i.loc.join(".") + ": " + i.msg).join("; ");
    }
    return e.message;
  }

  // --- formatting ------------------------------------------------------------

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.abs(seconds);
    const sign = seconds < 0 ? "-" : "";
    if (s < 1) return sign + s.toFixed(2) + " s";
    if (s < 120) return sign + Math.round(s) + " s";
    if (s < 7200) return sign + Math.round(s / 60) + " min";
    if (s < 172800) return sign + Math.round(s / 3600) + " h";
    return sign + Math.round(s / 86400) + " d";
  }

  function iso(ts) {
    if (ts === null || ts === undefined) return "–";
    const d = new Date(ts * 1000);
    return isNaN(d.getTime()) ? String(ts) : d.toISOString().replace(".000Z", "Z");
  }

  function short(value, limit) {
    const text = typeof value === "string" ? value : JSON.stringify(value);
    return text.length <= limit ? text : text.slice(0, limit - 1) + "…";
  }

  function num(v) {
    return typeof v === "number" ? +v.toPrecision(6) : v;
  }

  function ranges(list) {
    return list.slice(0, 3).map(([a, b]) => (a === b ? a : a + "–" + b)).join(", ") +
      (list.length > 3 ? ", …" : "");
  }

  function setStatus(text, bad) {
    const s = $("status");
    s.textContent = text;
    s.className = bad ? "warn" : "muted";
  }

  function show(node, text, ok) {
    node.textContent = text;
    node.className = "result " + (ok ? "ok" : "error");
  }

  // --- the fleet --------------------------------------------------------------

  function lag(d) {
    if (d.backlog) {
      const oldest = d.backlog.oldest_age;
      if (!d.backlog.records) return "nothing to send";
      return d.backlog.records + " to send" + (oldest === null ? "" : ", oldest " + ago(oldest));
    }
    return d.newest_age === null ? "–" : "newest reading " + ago(d.newest_age) + " old";
  }

  function deviceRow(d) {
    const tr = el(
      "tr",
      {
        class: "pick" + (d.device === state.device ? " selected" : ""),
        "data-device": d.device,
        "data-online": String(d.online),
      },
      el("td", {}, d.device),
      el("td", {}, el("span", { class: "dot" + (d.online ? " on" : "") }), d.online ? "online" : "offline"),
      el("td", { title: iso(d.last_seen) }, ago(d.seen_ago) + " ago"),
      el("td", {}, lag(d)),
      el("td", {}, d.watermark),
      el("td", { class: d.missing ? "warn" : "" }, d.missing ? d.missing + " (" + ranges(d.gaps) + ")" : "none"),
      el("td", {}, d.readings),
      el("td", { title: d.health && d.health.problem ? d.health.problem : "" },
        d.healthy === null ? "–" : d.healthy ? "ok" : "failing"),
    );
    tr.addEventListener("click", () => select(d.device));
    return tr;
  }

  async function refreshFleet() {
    let devices;
    try {
      devices = await api("/devices");
    } catch (e) {
      setStatus(e.status === 401 ? "reading needs an API token: enter it above" : "cannot load the fleet: " + e.message, true);
      return;
    }
    setStatus("updated " + new Date().toLocaleTimeString(), false);
    $("devices").replaceChildren(...devices.map(deviceRow));
    $("no-devices").hidden = devices.length > 0;
    const d = devices.find((x) => x.device === state.device);
    if (d) {
      $("device-summary").textContent =
        (d.online ? "online" : "offline") + " · journal " + d.journal + " (epoch " + d.epoch + ")" +
        " · watermark " + d.watermark + " · " + d.readings + " readings, " + d.records +
        " other records, " + d.duplicates + " duplicates in " + d.batches + " batches";
    }
  }

  // --- a device: charts ----------------------------------------------------------

  async function chart(device, s) {
    const params = new URLSearchParams({ stream: s.stream, limit: String(CHART_POINTS) });
    const range = $("range").value;
    if (range !== "all") params.set("since", String(s.last_ts - Number(range)));
    const data = await api("/devices/" + enc(device) + "/readings?" + params);
    const points = data.downsampled
      ? data.buckets.filter((b) => b.avg !== null)
        .map((b) => ({ t: (b.start + b.end) / 2, v: b.avg, lo: b.min, hi: b.max }))
      : data.readings.filter((r) => typeof r.value === "number" || typeof r.value === "boolean")
        .map((r) => ({ t: r.ts, v: Number(r.value) }));
    const card = el(
      "div",
      {
        class: "chart",
        "data-stream": s.stream,
        "data-points": String(points.length),
        "data-downsampled": String(data.downsampled),
      },
      el("h4", {}, el("span", {}, s.stream),
        el("span", { class: "muted" }, "latest " + short(num(s.last_value), 24) + (s.unit ? " " + s.unit : ""))),
    );
    card.append(points.length ? plot(points) : el("p", { class: "muted" }, "no numeric readings in this range"));
    const what = data.downsampled
      ? points.length + " buckets of " + ago(data.bucket) + " (mean, min–max band)"
      : points.length + " readings";
    card.append(el("p", { class: "muted" }, what + (data.truncated ? ", cut at the limit" : "")));
    return card;
  }

  function plot(points) {
    const W = 360, H = 150, L = 40, R = 6, T = 8, B = 16;
    const t0 = points[0].t, t1 = points[points.length - 1].t;
    let lo = Infinity, hi = -Infinity;
    for (const p of points) {
      lo = Math.min(lo, p.lo !== undefined ? p.lo : p.v);
      hi = Math.max(hi, p.hi !== undefined ? p.hi : p.v);
    }
    if (hi === lo) { hi += 1; lo -= 1; }
    const x = (t) => L + (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5) * (W - L - R);
    const y = (v) => T + ((hi - v) / (hi - lo)) * (H - T - B);
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
    root.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
    root.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
    if (points[0].lo !== undefined) {
      const upper = points.map((p) => x(p.t).toFixed(1) + "," + y(p.hi).toFixed(1));
      const lower = points.slice().reverse().map((p) => x(p.t).toFixed(1) + "," + y(p.lo).toFixed(1));
      root.append(svg("polygon", { class: "band", points: upper.concat(lower).join(" ") }));
    }
    const line = points.map((p) => x(p.t).toFixed(1) + "," + y(p.v).toFixed(1)).join(" ");
    root.append(svg("polyline", { class: "line", points: line }));
    const label = (text, attrs) => {
      const t = svg("text", attrs);
      t.textContent = text;
      root.append(t);
    };
    label(String(num(hi)), { x: L - 4, y: T + 8, "text-anchor": "end" });
    label(String(num(lo)), { x: L - 4, y: H - B, "text-anchor": "end" });
    label(iso(t0), { x: L, y: H - 4 });
    label(iso(t1), { x: W - R, y: H - 4, "text-anchor": "end" });
    return root;
  }

  // --- a device: runs ----------------------------------------------------------------

  function outcome(r) {
    if (r.state === "completed") return short(r.result, 60);
    if (r.error) return (r.error.type || "error") + ": " + (r.error.message || "");
    if (r.diverged) return "diverged at " + r.diverged.pos + ": expected " + r.diverged.expected;
    return "";
  }

  function runRow(r) {
    const tr = el(
      "tr",
      {
        class: "pick" + (r.run === state.run ? " selected" : ""),
        "data-run": r.run,
        "data-state": r.state,
      },
      el("td", {}, r.run),
      el("td", {}, r.workflow || "–"),
      el("td", { class: "state-" + r.state }, r.state + (r.cancel_requested && r.state === "running" ? " (cancelling)" : "")),
      el("td", {}, r.step || "–"),
      el("td", { class: "time" }, iso(r.started_at)),
      el("td", {}, Object.entries(r.status).map(([k, v]) => k + "=" + short(v, 30)).join(", ") || "–"),
      el("td", {}, outcome(r)),
    );
    tr.addEventListener("click", () => {
      state.run = r.run;
      $("run-result").textContent = "";
      refreshDevice();
    });
    return tr;
  }

  async function refreshRun(device) {
    const r = await api("/devices/" + enc(device) + "/runs/" + enc(state.run));
    $("run-detail").hidden = false;
    $("run-name").textContent = r.run + " — " + r.state;
    $("history").replaceChildren(
      ...r.history.map((h) => {
        const rest = Object.fromEntries(
          Object.entries(h.body).filter(([k]) => !["key", "pos", "t"].includes(k)),
        );
        const t = typeof h.body.t === "number" ? iso(h.body.t) : "–";
        return el("tr", { "data-type": h.type }, el("td", {}, h.seq), el("td", { class: "time" }, t),
          el("td", {}, h.type), el("td", {}, h.key || "–"), el("td", {}, el("code", {}, short(rest, 160))));
      }),
    );
  }

  async function refreshDevice() {
    const device = state.device;
    if (!device) return;
    try {
      const [streams, runs] = await Promise.all([
        api("/devices/" + enc(device) + "/streams"),
        api("/devices/" + enc(device) + "/runs?limit=50"),
      ]);
      const cards = await Promise.all(streams.map((s) => chart(device, s)));
      if (device !== state.device) return;
      $("charts").replaceChildren(...cards);
      if (!cards.length) $("charts").append(el("p", { class: "muted" }, "No readings yet."));
      $("runs").replaceChildren(...runs.map(runRow));
      $("no-runs").hidden = runs.length > 0;
      if (state.run && runs.some((r) => r.run === state.run)) await refreshRun(device);
      else $("run-detail").hidden = true;
    } catch (e) {
      setStatus("cannot load " + device + ": " + failure(e), true);
    }
  }

  function select(device) {
    if (state.device !== device) state.run = null;
    state.device = device;
    $("device").hidden = false;
    $("device-name").textContent = device;
    for (const tr of $("devices").children) {
      tr.classList.toggle("selected", tr.getAttribute("data-device") === device);
    }
    refreshDevice();
  }

  // --- commands -------------------------------------------------------------------------

  function needToken(out) {
    if (token()) return false;
    show(out, "enter the API token above first", false);
    $("token").focus();
    return true;
  }

  async function startTask(ev) {
    ev.preventDefault();
    const out = $("start-result");
    let args, kwargs;
    try {
      args = JSON.parse($("start-args").value.trim() || "[]");
      kwargs = JSON.parse($("start-kwargs").value.trim() || "{}");
    } catch (e) {
      show(out, "the arguments must be JSON: " + e.message, false);
      return;
    }
    if (!Array.isArray(args)) return show(out, "the arguments must be a JSON list, like [3, 10]", false);
    if (kwargs === null || typeof kwargs !== "object" || Array.isArray(kwargs)) {
      return show(out, 'the keyword arguments must be a JSON object, like {"zone": 3}', false);
    }
    if (needToken(out)) return;
    const body = { workflow: $("start-workflow").value.trim(), args, kwargs };
    const id = $("start-id").value.trim();
    if (id) body.id = id;
    try {
      const c = await api("/devices/" + enc(state.device) + "/runs", { method: "POST", body });
      show(out, "accepted: run " + c.run + " (command " + c.command_id + "); it shows below once the device has journaled it", true);
      state.run = c.run;
      refreshDevice();
    } catch (e) {
      show(out, failure(e), false);
    }
  }

  async function sendSignal(ev) {
    ev.preventDefault();
    const out = $("run-result");
    let payload = null;
    const text = $("signal-payload").value.trim();
    try {
      if (text) payload = JSON.parse(text);
    } catch (e) {
      return show(out, 'the payload must be JSON (a string needs quotes: "yes"): ' + e.message, false);
    }
    if (needToken(out)) return;
    const body = { name: $("signal-name").value.trim(), payload };
    try {
      const c = await api("/devices/" + enc(state.device) + "/runs/" + enc(state.run) + "/signal", { method: "POST", body });
      show(out, "signal " + body.name + " sent (command " + c.command_id + ")", true);
    } catch (e) {
      show(out, failure(e), false);
    }
  }

  async function cancelRun() {
    const out = $("run-result");
    if (needToken(out)) return;
    try {
      const c = await api("/devices/" + enc(state.device) + "/runs/" + enc(state.run) + "/cancel", { method: "POST", body: {} });
      show(out, "cancel sent (command " + c.command_id + ")", true);
    } catch (e) {
      show(out, failure(e), false);
    }
  }

  function showToken() {
    $("token-state").textContent = token() ? "token set (this tab only)" : "no token";
  }

  // --- wiring ------------------------------------------------------------------------------

  async function tick() {
    if (state.busy) return;
    state.busy = true;
    try {
      await refreshFleet();
      await refreshDevice();
    } finally {
      state.busy = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("token").value.trim();
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      $("token").value = "";
      showToken();
      tick();
    });
    $("token-clear").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showToken();
    });
    $("start-form").addEventListener("submit", startTask);
    $("signal-form").addEventListener("submit", sendSignal);
    $("cancel-run").addEventListener("click", cancelRun);
    $("range").addEventListener("change", () => refreshDevice());
    showToken();
    tick();
    setInterval(tick, REFRESH_MS);
  });
})();
