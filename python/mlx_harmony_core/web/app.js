// mlx-harmony-core chat page: a client of the server's own HTTP API (no libraries).
// Streams /v1/chat/completions; the settings form is built from the ChatRequest schema in
// /openapi.json; conversations live in localStorage, the API key in sessionStorage.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const CONVS = "mhc.conversations", CURRENT = "mhc.current", SETTINGS = "mhc.settings";
  const KEY = "mhc.key";
  // Request fields the page sets itself, or that a chat page has no use for.
  const SKIP = new Set(["model", "stream", "stream_options", "n", "messages", "logprobs",
    "top_logprobs", "max_completion_tokens", "logit_bias", "tool_choice"]);
  const FIRST = ["max_tokens", "reasoning_effort", "max_reasoning_tokens"];
  class LocalError extends Error {} // a message to show as is
  const S = { convs: {}, current: null, models: [], model: null, limit: null, fields: [],
    controller: null, editing: null, lastSave: 0 };

  // -- storage -----------------------------------------------------------------------------
  function load() {
    try { S.convs = JSON.parse(localStorage.getItem(CONVS) || "{}") || {}; } catch { S.convs = {}; }
    S.current = localStorage.getItem(CURRENT);
    if (!S.convs[S.current]) S.current = null;
  }
  function save(force) {
    const now = Date.now();
    if (!force && now - S.lastSave < 500) return;
    S.lastSave = now;
    try {
      localStorage.setItem(CONVS, JSON.stringify(S.convs));
      if (S.current) localStorage.setItem(CURRENT, S.current);
    } catch (e) { showError("Could not save the conversation in this browser: " + e.message); }
  }
  const hex = (n) => Array.from(crypto.getRandomValues(new Uint8Array(n)),
    (b) => b.toString(16).padStart(2, "0")).join("");
  function isoNow() {
    const d = new Date(), off = -d.getTimezoneOffset(), sign = off >= 0 ? "+" : "-";
    const p = (x) => String(Math.floor(Math.abs(x))).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:` +
      `${p(d.getMinutes())}:${p(d.getSeconds())}${sign}${p(off / 60)}:${p(off % 60)}`;
  }
  function conv() {
    if (!S.current) {
      const c = { id: hex(16), title: "New chat", created: isoNow(), updated: isoNow(),
        model: S.model, messages: [] };
      S.convs[c.id] = c;
      S.current = c.id;
      renderConvs();
    }
    return S.convs[S.current];
  }

  // -- HTTP --------------------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }
  async function api(path, init = {}, retried = false) {
    const res = await fetch(path, { ...init, headers: headers() });
    if (res.status === 401 && !retried) {
      await askKey(await errorText(res));
      return api(path, init, true);
    }
    return res;
  }
  async function errorText(res) {
    try {
      const body = await res.json();
      return `${res.status}: ${(body.error && body.error.message) || JSON.stringify(body)}`;
    } catch { return `${res.status} ${res.statusText}`; }
  }
  function askKey(why) {
    return new Promise((resolve, reject) => {
      const dlg = $("key-dialog"), form = $("key-form");
      let given = false;
      dlg.onclose = () => { if (!given) reject(new LocalError(why || "an API key is needed")); };
      $("key-why").textContent = (why ? why + ". " : "") +
        "Enter the server's API key; it is kept for this browser tab only.";
      $("key").value = "";
      form.onsubmit = (e) => {
        e.preventDefault();
        const key = $("key").value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY, key);
        given = true;
        dlg.close();
        resolve();
      };
      if (!dlg.open) dlg.showModal();
      $("key").focus();
    });
  }

  // -- settings, from the server's schema -------------------------------------------------
  const variant = (prop) => (prop.anyOf || [prop]).find((v) => v.type !== "null") || prop;
  function fieldFor(name, prop) {
    const v = variant(prop);
    const id = "set-" + name;
    const wrap = document.createElement("div");
    wrap.className = "setting";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = prop.title || name;
    wrap.append(label);
    let input, kind, hint = prop.description || "";
    if (name === "stop") {
      kind = "lines";
      input = document.createElement("textarea");
      input.rows = 2;
      hint = "stop strings, one per line";
    } else if (name === "response_format") {
      kind = "schema";
      input = document.createElement("textarea");
      input.rows = 4;
      hint = "a JSON schema the reply must match (or a whole response_format object)";
    } else if (name === "tools") {
      kind = "json";
      input = document.createElement("textarea");
      input.rows = 4;
      hint = 'function tools, a JSON array: [{"type": "function", "function": {...}}]';
    } else if (v.enum) {
      kind = "enum";
      input = document.createElement("select");
      input.append(new Option("(server default)", ""));
      for (const e of v.enum) input.append(new Option(e, e));
    } else if (v.type === "number" || v.type === "integer") {
      kind = v.type;
      input = document.createElement("input");
      input.type = "number";
      input.step = v.type === "integer" ? "1" : "any";
      const lo = v.minimum ?? v.exclusiveMinimum, hi = v.maximum ?? v.exclusiveMaximum;
      let max = hi;
      if (name === "max_tokens" && S.limit) max = S.limit;
      if (lo !== undefined) input.min = lo;
      if (max !== undefined && max < 1e15) input.max = max;
      const range = [];
      if (lo !== undefined) range.push((v.exclusiveMinimum !== undefined ? "> " : "≥ ") + lo);
      if (max !== undefined && max < 2147483647) range.push((v.exclusiveMaximum !== undefined ? "< " : "≤ ") + max);
      if (range.length) hint = (hint ? hint + "; " : "") + range.join(", ");
    } else {
      return null;
    }
    input.id = id;
    input.dataset.setting = name;
    input.dataset.kind = kind;
    wrap.append(input);
    if (hint) {
      const h = document.createElement("span");
      h.className = "hint";
      h.id = id + "-hint";
      h.textContent = hint;
      input.setAttribute("aria-describedby", h.id);
      wrap.append(h);
    }
    return wrap;
  }
  function buildSettings(schema) {
    const box = $("schema-fields");
    box.textContent = "";
    const props = schema.properties || {};
    const names = Object.keys(props).filter((n) => !SKIP.has(n));
    names.sort((a, b) => (FIRST.includes(b) - FIRST.includes(a)) ||
      ((FIRST.indexOf(a) + 1 || 99) - (FIRST.indexOf(b) + 1 || 99)));
    for (const name of names) {
      const el = fieldFor(name, props[name]);
      if (el) box.append(el);
    }
    restoreSettings();
  }
  function restoreSettings() {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(SETTINGS) || "{}") || {}; } catch { /* none */ }
    for (const el of document.querySelectorAll("[data-setting]")) {
      if (saved[el.dataset.setting] !== undefined) el.value = saved[el.dataset.setting];
    }
  }
  function storeSettings() {
    const out = {};
    for (const el of document.querySelectorAll("[data-setting]")) if (el.value) out[el.dataset.setting] = el.value;
    localStorage.setItem(SETTINGS, JSON.stringify(out));
  }
  function requestSettings() {
    const out = {};
    for (const el of document.querySelectorAll("#schema-fields [data-setting]")) {
      const raw = el.value.trim(), name = el.dataset.setting, kind = el.dataset.kind;
      if (!raw) continue;
      if (kind === "number" || kind === "integer") out[name] = Number(raw);
      else if (kind === "enum") out[name] = raw;
      else if (kind === "lines") out[name] = raw.split("\n").filter((s) => s);
      else {
        let value;
        try { value = JSON.parse(raw); } catch (e) {
          throw new LocalError(`${el.labels[0].textContent}: not valid JSON (${e.message})`);
        }
        if (kind === "schema" && !["text", "json_object", "json_schema"].includes(value.type)) {
          value = { type: "json_schema", json_schema: { name: "reply", schema: value, strict: true } };
        }
        out[name] = value;
      }
    }
    return out;
  }

  // -- rendering ---------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function renderConvs() {
    const sel = $("convs");
    sel.textContent = "";
    const list = Object.values(S.convs).sort((a, b) => (b.updated > a.updated ? 1 : -1));
    if (!list.length) sel.append(new Option("New chat", ""));
    for (const c of list) sel.append(new Option(c.title || "Untitled", c.id, false, c.id === S.current));
  }
  function renderAll() {
    const log = $("log");
    log.querySelectorAll(".msg").forEach((m) => m.remove());
    const c = S.current ? S.convs[S.current] : null;
    const msgs = c ? c.messages : [];
    $("empty").hidden = msgs.length > 0;
    msgs.forEach((m, i) => log.append(renderMsg(m, i, msgs)));
    updateButtons();
    log.scrollTop = log.scrollHeight;
  }
  function renderMsg(m, i, msgs) {
    const box = el("article", "msg " + m.role);
    box.dataset.index = i;
    const who = el("div", "who");
    who.append(el("span", "", { user: "You", assistant: "Assistant", tool: "Tool result",
      system: "System", developer: "Developer" }[m.role] || m.role));
    if (m.role === "tool" && m.name) who.append(el("span", "", `(${m.name})`));
    box.append(who);
    if (m.role === "assistant") {
      const det = el("details", "reasoning");
      det.append(el("summary", "", "Reasoning"));
      det.append(el("div", "text reasoning-text", m.reasoning || ""));
      det.hidden = !m.reasoning;
      if (m.streaming) det.open = true;
      box.append(det);
    }
    box.append(el("div", "text content", m.content || ""));
    if (m.role === "assistant") {
      box.append(el("div", "calls"));
      renderCalls(box, m, i, msgs);
      box.append(el("div", "stats", statsText(m)));
      if (m.error) box.append(el("div", "err", m.error));
    }
    if (m.role === "user") {
      const acts = el("div", "actions");
      const edit = el("button", "", "Edit");
      edit.type = "button";
      edit.setAttribute("aria-label", "Edit this message and resend");
      edit.onclick = () => startEdit(i);
      acts.append(edit);
      box.append(acts);
    }
    if (m.streaming) box.setAttribute("aria-busy", "true");
    return box;
  }
  function renderCalls(box, m, i, msgs) {
    const calls = box.querySelector(".calls");
    calls.textContent = "";
    for (const call of m.tool_calls || []) {
      const c = el("div", "call");
      c.append(el("div", "", "Tool call: "), el("code", "", `${call.name}(${call.arguments})`));
      const answered = msgs.slice(i + 1).some((x) => x.role === "tool" && x.tool_call_id === call.id);
      if (!answered && !m.streaming && i === msgs.length - 1) {
        const form = el("form");
        const id = "result-" + call.id;
        const label = el("label", "", `Result of ${call.name}`);
        label.htmlFor = id;
        const input = el("textarea");
        input.id = id;
        input.rows = 2;
        const send = el("button", "primary", "Send result");
        send.type = "submit";
        form.append(label, input, send);
        form.onsubmit = (e) => {
          e.preventDefault();
          if (S.controller) return;
          conv().messages.push({ role: "tool", content: input.value, tool_call_id: call.id,
            name: call.name, timestamp: isoNow() });
          generate();
        };
        c.append(form);
      }
      calls.append(c);
    }
  }
  function statsText(m) {
    if (m.streaming) return "…";
    const t = m.timings || {}, u = m.usage || {}, parts = [];
    if (t.ttft_s !== undefined) parts.push(`TTFT ${t.ttft_s.toFixed(2)} s`);
    if (t.tokens_per_s !== undefined) parts.push(`${t.tokens_per_s.toFixed(1)} tok/s`);
    if (u.completion_tokens !== undefined) parts.push(`${u.completion_tokens} tokens`);
    if (u.prompt_tokens !== undefined) parts.push(`prompt ${u.prompt_tokens}`);
    if (u.cached_prompt_tokens !== undefined) parts.push(`cached ${u.cached_prompt_tokens}`);
    if (m.finish_reason) parts.push(m.finish_reason === "cancelled" ? "stopped" : `finish: ${m.finish_reason}`);
    if (m.model) parts.push(m.model);
    return parts.join(" · ");
  }
  function updateButtons() {
    const busy = !!S.controller;
    const c = S.current ? S.convs[S.current] : null;
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("regen").disabled = busy || !c || !c.messages.some((m) => m.role === "user");
    $("status").textContent = busy ? "Generating…" : "";
  }
  function showError(text) {
    const e = $("error");
    e.textContent = text || "";
    e.hidden = !text;
  }

  // -- conversation actions -----------------------------------------------------------------
  function startEdit(i) {
    if (S.controller) return;
    S.editing = i;
    $("message").value = conv().messages[i].content || "";
    $("editing").hidden = false;
    $("message").focus();
  }
  function cancelEdit() {
    S.editing = null;
    $("editing").hidden = true;
  }
  function send() {
    const text = $("message").value;
    if (!text.trim() || S.controller) return;
    const c = conv();
    if (S.editing !== null) {
      c.messages.splice(S.editing);
      cancelEdit();
    }
    c.messages.push({ role: "user", content: text, timestamp: isoNow() });
    if (c.title === "New chat") c.title = text.trim().slice(0, 40);
    $("message").value = "";
    renderConvs();
    generate();
  }
  function regenerate() {
    if (S.controller) return;
    const c = conv();
    while (c.messages.length && c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
    if (c.messages.length) generate();
  }
  function apiMessages(msgs) {
    const out = [];
    const system = $("set-system").value.trim();
    if (system) out.push({ role: "system", content: system });
    for (const m of msgs) {
      if (m.role === "assistant") {
        if (!m.content && !(m.tool_calls || []).length) continue; // stopped before any text
        const a = { role: "assistant", content: m.content || (m.tool_calls ? null : "") };
        if (m.tool_calls && m.tool_calls.length) {
          a.tool_calls = m.tool_calls.map((t) => ({ id: t.id, type: "function",
            function: { name: t.name, arguments: t.arguments } }));
        }
        out.push(a);
      } else if (m.role === "tool") {
        out.push({ role: "tool", content: m.content, tool_call_id: m.tool_call_id, name: m.name });
      } else {
        out.push({ role: m.role, content: m.content });
      }
    }
    return out;
  }
  async function generate() {
    const c = conv();
    showError("");
    let settings;
    try { settings = requestSettings(); } catch (e) { showError(e.message); renderAll(); return; }
    const body = { model: S.model || undefined, messages: apiMessages(c.messages), stream: true,
      stream_options: { include_usage: true }, ...settings };
    const m = { role: "assistant", content: "", reasoning: "", timestamp: isoNow(),
      model: S.model, params: settings, streaming: true };
    c.messages.push(m);
    c.updated = isoNow();
    const ctrl = new AbortController();
    S.controller = ctrl;
    renderAll();
    const box = $("log").lastElementChild;
    const view = { text: box.querySelector(".content"), reasoning: box.querySelector(".reasoning-text"),
      details: box.querySelector("details"), stats: box.querySelector(".stats") };
    const t0 = performance.now();
    let first = null, usage = null, finish = null, failed = null;
    const calls = [];
    const seen = () => { if (first === null) first = performance.now(); };
    try {
      const res = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
        signal: ctrl.signal });
      if (!res.ok) throw new LocalError(await errorText(res));
      const reader = res.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const obj = JSON.parse(data);
            if (obj.error) { failed = obj.error.message; continue; }
            if (obj.usage) usage = obj.usage;
            for (const ch of obj.choices || []) {
              const d = ch.delta || {};
              const r = d.reasoning_content || d.reasoning;
              if (r) { seen(); m.reasoning += r; view.reasoning.textContent = m.reasoning; view.details.hidden = false; }
              if (d.content) { seen(); m.content += d.content; view.text.textContent = m.content; }
              for (const t of d.tool_calls || []) {
                seen();
                const slot = calls[t.index || 0] || (calls[t.index || 0] = { id: "", name: "", arguments: "" });
                if (t.id) slot.id = t.id;
                if (t.function && t.function.name) slot.name += t.function.name;
                if (t.function && t.function.arguments) slot.arguments += t.function.arguments;
              }
              if (ch.finish_reason) finish = ch.finish_reason;
            }
          }
          save(false);
        }
        const log = $("log");
        if (log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
      }
    } catch (e) {
      if (e.name === "AbortError") finish = "cancelled";
      else failed = e instanceof LocalError ? e.message : `request failed: ${e.message}`;
    }
    const t1 = performance.now();
    if (calls.length) m.tool_calls = calls.map((t) => ({ id: t.id || "call_" + hex(8), name: t.name, arguments: t.arguments }));
    delete m.streaming;
    m.finish_reason = finish || (failed ? "error" : "stop");
    if (usage) {
      m.usage = { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens,
        total_tokens: usage.total_tokens,
        cached_prompt_tokens: (usage.prompt_tokens_details || {}).cached_tokens || 0 };
    }
    m.timings = { total_s: (t1 - t0) / 1000 };
    if (first !== null) {
      m.timings.ttft_s = (first - t0) / 1000;
      // Over the whole reply: text can arrive in bursts (held back for stop strings).
      const n = usage ? usage.completion_tokens : 0;
      if (n > 0 && t1 > t0) m.timings.tokens_per_s = n / ((t1 - t0) / 1000);
    }
    if (failed) {
      showError(failed);
      if (!m.content && !m.reasoning && !calls.length) c.messages.pop(); // nothing came: no reply
      else m.error = failed;
    }
    S.controller = null;
    c.updated = isoNow();
    save(true);
    renderAll();
    const det = $("log").querySelector(".msg.assistant:last-of-type details");
    if (det && m.content) det.open = false;
  }
  function stop() {
    if (S.controller) S.controller.abort();
  }

  // -- export: the chat-log JSON the CLI reads (`chat --chat FILE`) -------------------------
  function exportLog(id) {
    const c = S.convs[id || S.current];
    if (!c) return null;
    const ints = (u) => Object.fromEntries(Object.entries(u || {}).filter(([, v]) => Number.isInteger(v)));
    const nums = (t) => Object.fromEntries(Object.entries(t || {}).filter(([, v]) => Number.isFinite(v)));
    const messages = c.messages.map((m) => {
      const o = { role: m.role, content: m.content ?? null, timestamp: m.timestamp || c.created };
      if (m.role === "assistant") {
        o.channel = "final";
        if (m.reasoning) o.reasoning = m.reasoning;
        if (m.tool_calls && m.tool_calls.length) o.tool_calls = m.tool_calls.map((t) => ({ id: t.id, name: t.name, arguments: t.arguments }));
        if (m.model) o.model = m.model;
        if (m.params && Object.keys(m.params).length) o.params = m.params;
        if (m.finish_reason) o.finish_reason = m.finish_reason;
        if (m.usage) o.usage = ints(m.usage);
        if (m.timings) o.timings = nums(m.timings);
      }
      if (m.tool_call_id) o.tool_call_id = m.tool_call_id;
      if (m.name) o.name = m.name;
      return o;
    });
    const system = $("set-system").value.trim();
    return JSON.stringify({ format: "mlx-harmony-core-chat", version: 1, id: c.id,
      created: c.created, updated: c.updated, model: c.model || S.model || undefined,
      settings: system ? { system } : {}, messages }, null, 2) + "\n";
  }
  function download() {
    const text = exportLog();
    if (!text) { showError("Nothing to export yet."); return; }
    const c = S.convs[S.current];
    const name = (c.title || "chat").replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 60) || "chat";
    const a = el("a");
    a.href = URL.createObjectURL(new Blob([text], { type: "application/json" }));
    a.download = name + ".json";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  // -- start -------------------------------------------------------------------------------
  async function start() {
    load();
    restoreSettings();
    renderConvs();
    renderAll();
    $("composer").onsubmit = (e) => { e.preventDefault(); send(); };
    $("message").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && S.controller && !$("key-dialog").open) { e.preventDefault(); stop(); }
    });
    $("stop").onclick = stop;
    $("regen").onclick = regenerate;
    $("cancel-edit").onclick = cancelEdit;
    $("new").onclick = () => { if (S.controller) return; S.current = null; cancelEdit(); renderConvs(); renderAll(); $("message").focus(); };
    $("delete").onclick = () => {
      if (S.controller || !S.current) return;
      delete S.convs[S.current];
      S.current = Object.keys(S.convs)[0] || null;
      save(true);
      if (!S.current) localStorage.removeItem(CURRENT);
      renderConvs();
      renderAll();
    };
    $("convs").onchange = (e) => {
      if (S.controller) { renderConvs(); return; }
      S.current = e.target.value || null;
      cancelEdit();
      save(true);
      renderAll();
    };
    $("export").onclick = download;
    $("settings-toggle").onclick = () => {
      const panel = $("settings"), open = panel.hidden;
      panel.hidden = !open;
      $("settings-toggle").setAttribute("aria-expanded", String(open));
      if (open) $("set-system").focus();
    };
    $("settings").addEventListener("keydown", (e) => {
      if (e.key === "Escape" && !S.controller) { $("settings-toggle").click(); $("settings-toggle").focus(); }
    });
    $("settings-form").addEventListener("input", storeSettings);
    $("settings-form").onsubmit = (e) => e.preventDefault();
    $("reset-settings").onclick = () => {
      for (const x of document.querySelectorAll("[data-setting]")) x.value = "";
      storeSettings();
    };
    $("model").onchange = (e) => { S.model = e.target.value; if (S.current) S.convs[S.current].model = S.model; };
    try {
      const res = await api("/v1/models");
      if (!res.ok) throw new LocalError(await errorText(res));
      S.models = (await res.json()).data || [];
      const sel = $("model");
      for (const m of S.models) sel.append(new Option(m.id, m.id));
      const wanted = S.current && S.convs[S.current].model;
      S.model = S.models.some((m) => m.id === wanted) ? wanted : (S.models[0] || {}).id || null;
      sel.value = S.model || "";
      $("model-pick").hidden = S.models.length < 2;
      $("model-name").textContent = S.models.length === 1 ? "Model: " + S.model : "";
      S.limit = (S.models[0] || {}).max_tokens_limit || null;
    } catch (e) {
      showError("Could not list the models: " + e.message);
    }
    try {
      const res = await fetch("/openapi.json");
      if (!res.ok) throw new LocalError(await errorText(res));
      const doc = await res.json();
      buildSettings(doc.components.schemas.ChatRequest);
    } catch (e) {
      $("schema-fields").textContent = "The server's request schema could not be read: " + e.message;
    }
    document.body.dataset.ready = "true";
  }
  window.mhc = { exportLog, state: S };
  start();
})();
