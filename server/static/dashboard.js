// The edgehmoe run dashboard: polls GET /api/state (ETag: an unchanged state costs a 304) and
// renders it. Read-only; every value from the run goes into the page as text (textContent),
// never as HTML: device ids, platforms and refusal reasons come from devices.
"use strict";
(function () {
  const POLL_MS = 1000;
  const COLORS = { hmoe: "#2563eb", flat: "#c62828", run: "#2563eb" };
  const view = { page: 0, pageSize: 50, sortKey: "id", sortDir: 1, filter: "", problems: false, offline: false };
  let state = null;
  let etag = null;
  let snapshotAt = 0; // client time at which `state` arrived
  let serverOffset = 0; // server clock - client clock, seconds
  let lastContact = 0;
  let failing = false;
  const charts = {};

  const $ = (id) => document.getElementById(id);
  const now = () => Date.now() / 1000 + serverOffset;
  const set = (el, s) => { if (el.textContent !== s) el.textContent = s; };

  function fmtNum(v, digits) {
    return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits);
  }
  function fmtDur(s) {
    if (s === null || s === undefined || !Number.isFinite(s)) return "–";
    s = Math.max(0, Math.round(s));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
    return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
  }
  function fmtTime(unix) {
    if (!unix) return "–";
    const d = new Date(unix * 1000);
    const t = d.toLocaleTimeString([], { hour12: false });
    return d.toDateString() === new Date().toDateString() ? t
      : `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${t}`;
  }
  function pct(v, ref) {
    return v === null || v === undefined || !ref ? "–" : `${(100 * v / ref).toFixed(1)}%`;
  }

  // ------------------------------------------------------------------ polling
  async function poll() {
    try {
      const headers = etag ? { "If-None-Match": etag } : {};
      const r = await fetch("/api/state", { headers, cache: "no-store", credentials: "same-origin" });
      const st = parseFloat(r.headers.get("X-Server-Time"));
      if (Number.isFinite(st)) serverOffset = st - Date.now() / 1000;
      if (r.status === 200) {
        const body = await r.json();
        etag = r.headers.get("ETag");
        state = body;
        snapshotAt = Date.now() / 1000;
        render();
      } else if (r.status === 401) {
        throw new Error("this dashboard needs its token: open the URL edgehmoe-server printed (…/?token=…)");
      } else if (r.status !== 304) {
        throw new Error(`the server answered ${r.status}`);
      }
      lastContact = Date.now() / 1000;
      failing = false;
    } catch (e) {
      failing = e.message || "the dashboard server is unreachable";
    }
    tick();
    setTimeout(poll, POLL_MS);
  }

  // Clock-driven fields, every second between polls.
  function tick() {
    const conn = $("conn");
    if (failing) {
      const why = typeof failing === "string" && failing.startsWith("this dashboard") ? failing
        : "the dashboard server is unreachable (the run's process ended?); showing the last state";
      set(conn, why);
      $("status").className = "badge unreachable";
    } else if (lastContact) {
      set(conn, `updated ${fmtTime(lastContact)} · polling every ${POLL_MS / 1000} s`);
    }
    if (!state) return;
    const t = now();
    const end = state.finished_unix || (state.status === "running" || state.status === "starting" ? t : null);
    set($("elapsed"), state.started_unix && end ? fmtDur(end - state.started_unix) : "–");
    const age = state.snapshot_unix ? t - state.snapshot_unix : Date.now() / 1000 - snapshotAt;
    set($("eta"), state.eta_s !== null && state.eta_s !== undefined ? fmtDur(state.eta_s - age)
      : state.status === "finished" ? "done" : "–");
  }

  // ------------------------------------------------------------------ rendering
  function render() {
    const t0 = performance.now();
    const s = state;
    document.title = `${s.run} · round ${s.round}/${s.rounds} · edgehmoe`;
    set($("run-name"), s.run);
    set($("status"), s.status);
    $("status").className = `badge ${s.status}`;
    set($("round"), String(s.round));
    set($("rounds"), String(s.rounds));
    set($("phase"), s.phase && s.layout === "simulate" ? `(${s.phase} model)` : s.phase ? `(${s.phase})` : "");
    if (s.training) {
      const t = s.training;
      const others = Object.entries(t.outcomes || {}).filter(([k]) => k !== "ok").map(([k, n]) => `, ${n} ${k}`).join("");
      set($("training"), `${t.experts.join(", ")} · round ${t.round}, ${(t.outcomes || {}).ok || 0}/${t.asked} answered${others}`);
    } else if (s.last_experts && s.last_experts.length) {
      set($("training"), `${s.status === "finished" ? "done; last" : "last"}: ${s.last_experts.join(", ")}`);
    } else {
      set($("training"), "–");
    }
    set($("online"), `${s.devices_online} / ${s.devices.length}`);
    const h = s.heldout;
    set($("heldout"), h ? ["hmoe", "flat"].filter((k) => h[k]).map((k) => `${k} ${fmtNum(h[k].info_f1, 4)}`).join(" · ") +
      (h.split ? ` (${h.split})` : "") : "after the run");
    set($("phases"), s.phases.map((p) => `${p.kind}: ${p.round}/${p.rounds} rounds, ${p.status}` +
      (p.state && p.status === "running" ? ` (${p.state})` : "")).join(" · "));
    document.body.dataset.round = String(s.round);
    document.body.dataset.status = s.status;
    renderCharts(s);
    renderDevices();
    renderExperts(s);
    document.body.dataset.renderMs = (performance.now() - t0).toFixed(1);
  }

  function chart(id, config) {
    if (typeof Chart === "undefined") return null; // the vendored script did not load
    if (!charts[id]) {
      Chart.defaults.animation = false;
      charts[id] = new Chart($(id), config);
    }
    return charts[id];
  }

  function countPoints(datasets) {
    return datasets.reduce((n, d) => n + d.data.filter((v) => v !== null && v !== undefined &&
      (typeof v !== "object" || v.y !== null)).length, 0);
  }

  function update(id, config, labels, datasets) {
    const c = chart(id, config);
    const points = countPoints(datasets.filter((d) => !d.reference));
    $(id).dataset.points = String(points);
    if (!c) return;
    c.data.labels = labels;
    c.data.datasets = datasets;
    c.update("none");
  }

  function baseOptions(yTitle, xTitle) {
    return {
      responsive: true, maintainAspectRatio: false, animation: false,
      plugins: { legend: { position: "bottom" } },
      scales: {
        x: { title: { display: !!xTitle, text: xTitle || "" } },
        y: { beginAtZero: true, title: { display: true, text: yTitle } },
      },
    };
  }

  function renderCharts(s) {
    const f1 = Object.entries(s.val_info_f1).map(([kind, pts]) => ({
      label: kind === "run" ? "validation" : kind, data: pts.map(([x, y]) => ({ x, y })),
      borderColor: COLORS[kind] || "#555", backgroundColor: COLORS[kind] || "#555", tension: 0, pointRadius: 3,
    }));
    const f1opts = baseOptions("validation info-F1", "round");
    f1opts.scales.x.type = "linear";
    f1opts.scales.x.ticks = { precision: 0 };
    update("chart-f1", { type: "line", data: { datasets: [] }, options: f1opts }, undefined, f1);

    const experts = s.experts || [];
    const labels = experts.map((e) => `${e.node}:${e.name}`.slice(0, 18));
    for (const [id, key, title] of [["chart-time", "round_time_ms", "ms / round"], ["chart-mem", "round_mem_mb", "MB / round"]]) {
      const ds = [{ type: "bar", label: "expert (median)", data: experts.map((e) => e[key]), backgroundColor: "#60a5fa" }];
      const ref = s.flat_cost && s.flat_cost[key];
      if (ref !== null && ref !== undefined) {
        // one expert: a line needs two points, so show the point itself
        ds.push({ type: "line", label: "flat", data: experts.map(() => ref), borderColor: COLORS.flat,
          backgroundColor: COLORS.flat, borderDash: [6, 4], pointRadius: experts.length > 1 ? 0 : 5, reference: true });
      }
      update(id, { type: "bar", data: { labels: [], datasets: [] }, options: baseOptions(title) }, labels, ds);
    }
    const visitOpts = baseOptions("rounds updated");
    visitOpts.scales.y.ticks = { precision: 0 };
    update("chart-visits", { type: "bar", data: { labels: [], datasets: [] }, options: visitOpts },
      labels, [{ label: "visits", data: experts.map((e) => e.visits),
        backgroundColor: experts.map((e) => (e.visits ? "#34d399" : "#f87171")) }]);
  }

  // ------------------------------------------------------------------ devices
  function problems(d) {
    const c = d.counts;
    return c.refused + c.error + c.timeout + c.rejected + c.offline;
  }
  function sortValue(d, key) {
    switch (key) {
      case "status": return (d.online ? 0 : 1) * 1e12 + (d.since_unix || 0);
      case "last": return d.last ? d.last.round + (d.last.phase === "flat" ? 1e6 : 0) : -1;
      case "reason": return d.problems.length ? d.problems[d.problems.length - 1].reason : "";
      case "ok": case "refused": case "timeout": case "rejected": case "offline": return d.counts[key];
      default: return d[key] === null || d[key] === undefined ? -Infinity : d[key];
    }
  }
  function visibleDevices() {
    const q = view.filter.trim().toLowerCase();
    let rows = state.devices;
    if (view.problems) rows = rows.filter((d) => problems(d) > 0);
    if (view.offline) rows = rows.filter((d) => !d.online);
    if (q) {
      rows = rows.filter((d) => [d.id, d.platform, d.version, d.task || "", d.last ? d.last.expert : "",
        ...d.problems.map((p) => p.reason)].some((v) => String(v).toLowerCase().includes(q)));
    }
    const k = view.sortKey;
    const dir = view.sortDir;
    return rows.slice().sort((a, b) => {
      const va = sortValue(a, k);
      const vb = sortValue(b, k);
      if (va < vb) return -dir;
      if (va > vb) return dir;
      return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
    });
  }

  function cell(tr, value, cls, title) {
    const td = document.createElement("td");
    td.textContent = value;
    if (cls) td.className = cls;
    if (title) td.title = title;
    tr.appendChild(td);
    return td;
  }

  const live = () => state.status === "running" || state.status === "starting";

  function statusText(d) {
    if (d.online) {
      const since = d.since_unix ? ` since ${fmtTime(d.since_unix)}` : "";
      return d.task ? `training ${d.task}` : `online${since}`;
    }
    if (!live()) return `seen ${fmtTime(d.last_seen_unix)}`;
    return `offline since ${fmtTime(d.since_unix)}`;
  }

  function renderDevices() {
    if (!state) return;
    const rows = visibleDevices();
    const pages = Math.max(1, Math.ceil(rows.length / view.pageSize));
    view.page = Math.min(view.page, pages - 1);
    const start = view.page * view.pageSize;
    const shown = rows.slice(start, start + view.pageSize);
    const frag = document.createDocumentFragment();
    const keys = [...$("devices").tHead.rows[0].cells].map((th) => th.dataset.key);
    for (const d of shown) {
      const tr = document.createElement("tr");
      tr.dataset.device = d.id;
      tr.dataset.online = d.online ? "1" : "0";
      cell(tr, d.id);
      cell(tr, statusText(d), d.online ? (d.task ? "busy" : "online") : "offline",
        live() ? "" : "the run is not live: when the server last heard from this device");
      cell(tr, `${fmtNum(d.ram_mb, 0)} / ${d.budget_mb ? fmtNum(d.budget_mb, 0) : "none"}`, "num");
      cell(tr, d.cores ? String(d.cores) : "–", "num");
      const plat = d.platform.length > 24 ? `${d.platform.slice(0, 23)}…` : d.platform;
      cell(tr, plat || "–", null, `${d.platform}${d.version ? ` · edgehmoe ${d.version}` : ""}`);
      cell(tr, `${d.samples}`, "num", `${d.classes} classes`);
      const l = d.last;
      cell(tr, l ? `${state.layout === "simulate" ? l.phase + " " : ""}r${l.round} ${l.expert} ${l.outcome}` : "–");
      cell(tr, fmtNum(d.last_time_ms, 0), "num");
      cell(tr, fmtNum(d.last_mem_mb, 1), "num", d.last_peak_mb ? `peak RSS ${fmtNum(d.last_peak_mb, 0)} MB` : "");
      cell(tr, String(d.counts.ok), "num");
      for (const k of ["refused", "timeout", "rejected", "offline"]) {
        cell(tr, String(d.counts[k] + (k === "refused" ? d.counts.error : 0)), d.counts[k] ? "num bad" : "num");
      }
      const p = d.problems[d.problems.length - 1];
      const where = (x) => `${state.layout === "simulate" ? x.phase + " " : ""}r${x.round}`;
      cell(tr, p ? `${p.outcome} (${where(p)}): ${p.reason}` : "", "reason",
        d.problems.map((x) => `${x.outcome} (${where(x)}): ${x.reason}`).join("\n"));
      keys.forEach((k, i) => { if (tr.cells[i]) tr.cells[i].dataset.col = k; });
      frag.appendChild(tr);
    }
    $("devices").tBodies[0].replaceChildren(frag);
    set($("page-info"), rows.length ? `${start + 1}–${start + shown.length} of ${rows.length} · page ${view.page + 1}/${pages}`
      : "no device matches");
    $("page-prev").disabled = view.page === 0;
    $("page-next").disabled = view.page >= pages - 1;
    set($("device-count"), `(${state.devices_online} online of ${state.devices.length})`);
    for (const th of $("devices").tHead.rows[0].cells) {
      th.classList.toggle("sorted-asc", th.dataset.key === view.sortKey && view.sortDir > 0);
      th.classList.toggle("sorted-desc", th.dataset.key === view.sortKey && view.sortDir < 0);
    }
  }

  // ------------------------------------------------------------------ Table 1
  function renderExperts(s) {
    const frag = document.createDocumentFragment();
    const f = s.flat_cost;
    if (f) {
      const tr = document.createElement("tr");
      tr.dataset.node = "flat";
      for (const [v, c] of [["flat (reference)"], ["–", "num"], ["–", "num"], [f.params ?? "–", "num"], ["–", "num"],
        [String(f.device_rounds), "num"], [fmtNum(f.round_time_ms, 1), "num"], [f.round_time_ms ? "100%" : "–", "num"],
        [fmtNum(f.round_mem_mb, 1), "num"], [f.round_mem_mb ? "100%" : "–", "num"], [fmtNum(f.peak_rss_mb, 0), "num"]]) {
        cell(tr, String(v), c);
      }
      frag.appendChild(tr);
    }
    for (const e of s.experts) {
      const tr = document.createElement("tr");
      tr.dataset.node = String(e.node);
      if (!e.visits) tr.className = "never";
      cell(tr, `${e.node}:${e.name}`, null, e.visits ? "" : "never trained yet");
      cell(tr, String(e.depth), "num");
      cell(tr, String(e.children), "num");
      cell(tr, e.params === null ? "–" : String(e.params), "num");
      cell(tr, String(e.visits), "num");
      cell(tr, String(e.device_rounds), "num");
      cell(tr, fmtNum(e.round_time_ms, 1), "num");
      cell(tr, pct(e.round_time_ms, f && f.round_time_ms), "num");
      cell(tr, fmtNum(e.round_mem_mb, 1), "num");
      cell(tr, pct(e.round_mem_mb, f && f.round_mem_mb), "num");
      cell(tr, fmtNum(e.peak_rss_mb, 0), "num");
      frag.appendChild(tr);
    }
    $("experts").tBodies[0].replaceChildren(frag);
  }

  // ------------------------------------------------------------------ controls
  function wire() {
    $("device-filter").addEventListener("input", (e) => { view.filter = e.target.value; view.page = 0; renderDevices(); });
    $("device-problems").addEventListener("change", (e) => { view.problems = e.target.checked; view.page = 0; renderDevices(); });
    $("device-offline").addEventListener("change", (e) => { view.offline = e.target.checked; view.page = 0; renderDevices(); });
    $("page-prev").addEventListener("click", () => { view.page = Math.max(0, view.page - 1); renderDevices(); });
    $("page-next").addEventListener("click", () => { view.page += 1; renderDevices(); });
    for (const th of $("devices").tHead.rows[0].cells) {
      th.addEventListener("click", () => {
        const k = th.dataset.key;
        view.sortDir = view.sortKey === k ? -view.sortDir : 1;
        view.sortKey = k;
        renderDevices();
      });
    }
    setInterval(tick, 1000);
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", wire);
  else wire();
})();
