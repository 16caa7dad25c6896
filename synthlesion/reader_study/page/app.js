"use strict";
// The reader page: one case at a time, answers saved on the server after each case.
const state = { reader: null, token: null, cases: [], answers: {}, submitted: false,
                index: 0, pending: null, view: null, outline: false, busy: false };
const $ = (id) => document.getElementById(id);

function status(text) { $("status").textContent = text || ""; }

async function api(path, body) {
  const response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                       body: JSON.stringify(body) });
  const reply = await response.json();
  if (!response.ok) { throw new Error(reply.error || response.statusText); }
  return reply;
}

function newToken() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function login(reader, token) {
  const reply = await api("/api/login", { reader, token });
  state.reader = reader; state.token = token;
  localStorage.setItem("reader", reader); localStorage.setItem("token", token);
  apply(reply);
  const first = state.cases.findIndex((c) => !(c in state.answers));
  state.index = first < 0 ? state.cases.length - 1 : first;
  $("login").hidden = true;
  if (state.submitted) { $("done").hidden = false; return; }
  $("reading").hidden = false;
  $("who").textContent = "reader " + reader;
  await show();
}

function apply(reply) {
  state.cases = reply.cases; state.answers = reply.answers; state.submitted = reply.submitted;
}

async function fetchView(id) {
  const [meta, voxels, mask] = await Promise.all([
    fetch("cases/" + id + ".json").then((r) => r.json()),
    fetch("cases/" + id + ".bin").then((r) => r.arrayBuffer()),
    fetch("cases/" + id + ".mask").then((r) => r.arrayBuffer()),
  ]);
  return { meta, voxels: new Float32Array(voxels), mask: new Uint8Array(mask),
           slices: meta.centre.slice() };
}

function planes(view) {
  // (name, slicing axis, horizontal axis, vertical axis)
  if (view.meta.dims === 2) { return [["slice", null, 0, 1]]; }
  return [["axial", 2, 0, 1], ["coronal", 1, 0, 2], ["sagittal", 0, 1, 2]];
}

function value(view, idx) {
  const s = view.meta.shape;
  const flat = view.meta.dims === 2 ? idx[0] * s[1] + idx[1] : (idx[0] * s[1] + idx[1]) * s[2] + idx[2];
  return flat;
}

function draw() {
  const view = state.view;
  if (!view) { return; }
  const width = parseFloat($("window-width").value), level = parseFloat($("window-level").value);
  const low = level - width / 2;
  for (const [name, axis, h, v] of planes(view)) {
    const canvas = document.getElementById("canvas-" + name);
    const s = view.meta.shape, nh = s[h], nv = s[v];
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(nh, nv);
    const idx = view.meta.dims === 2 ? [0, 0] : [0, 0, 0];
    if (axis !== null) { idx[axis] = view.slices[axis]; }
    for (let j = 0; j < nv; j++) {
      for (let i = 0; i < nh; i++) {
        idx[h] = i; idx[v] = nv - 1 - j;  // the vertical axis points up
        const flat = value(view, idx);
        let g = (view.voxels[flat] - low) / width;
        g = Math.max(0, Math.min(1, g)) * 255;
        const p = 4 * (j * nh + i);
        let edge = false;
        if (state.outline && view.mask[flat]) {
          for (const [dh, dv] of [[1, 0], [-1, 0], [0, 1], [0, -1]]) {
            const n = idx.slice(); n[h] = i + dh; n[v] = nv - 1 - j + dv;
            if (n[h] < 0 || n[v] < 0 || n[h] >= nh || n[v] >= nv || !view.mask[value(view, n)]) { edge = true; }
          }
        }
        img.data[p] = edge ? 255 : g; img.data[p + 1] = edge ? 60 : g; img.data[p + 2] = edge ? 60 : g;
        img.data[p + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    const label = document.getElementById("label-" + name);
    if (label && axis !== null) { label.textContent = name + " " + (view.slices[axis] + 1) + "/" + s[axis]; }
  }
}

function layout(view) {
  const box = $("views");
  box.innerHTML = "";
  const sp = view.meta.spacing;
  for (const [name, axis, h, v] of planes(view)) {
    const div = document.createElement("div"); div.className = "view";
    const canvas = document.createElement("canvas");
    canvas.id = "canvas-" + name; canvas.width = view.meta.shape[h]; canvas.height = view.meta.shape[v];
    const scale = 320 / Math.max(view.meta.shape[h] * sp[h], view.meta.shape[v] * sp[v]);
    canvas.style.width = (view.meta.shape[h] * sp[h] * scale) + "px";
    canvas.style.height = (view.meta.shape[v] * sp[v] * scale) + "px";
    if (axis !== null) {
      canvas.addEventListener("wheel", (event) => {
        event.preventDefault();
        const step = event.deltaY > 0 ? 1 : -1;
        view.slices[axis] = Math.max(0, Math.min(view.meta.shape[axis] - 1, view.slices[axis] + step));
        draw();
      });
    }
    const label = document.createElement("span"); label.id = "label-" + name; label.textContent = name;
    div.appendChild(canvas); div.appendChild(label); box.appendChild(div);
  }
  const [lo, hi] = view.meta.range, [centre, width] = view.meta.window;
  const span = Math.max(hi - lo, 1e-6);
  $("window-width").min = span / 100; $("window-width").max = Math.max(2 * span, width);
  $("window-width").step = span / 200; $("window-width").value = width;
  $("window-level").min = Math.min(lo, centre); $("window-level").max = Math.max(hi, centre);
  $("window-level").step = span / 200; $("window-level").value = centre;
}

async function show() {
  // no answer is taken while the next case loads: it would go to a case not yet on screen
  state.busy = true; state.view = null;
  $("views").innerHTML = "";
  try {
    const id = state.cases[state.index];
    state.pending = state.answers[id] ? state.answers[id].answer : null;
    state.view = await fetchView(id);
    layout(state.view);
    refreshButtons();
    draw();
  } finally { state.busy = false; }
}

function refreshButtons() {
  const id = state.cases[state.index], saved = state.answers[id];
  $("progress").textContent = "case " + (state.index + 1) + " of " + state.cases.length + " \u00b7 " +
    Object.keys(state.answers).length + " answered";
  for (const button of document.querySelectorAll("[data-answer]")) {
    button.classList.toggle("chosen", button.dataset.answer === state.pending);
  }
  for (const button of document.querySelectorAll(".conf")) {
    button.classList.toggle("chosen", !!saved && saved.answer === state.pending &&
                            String(saved.confidence) === button.dataset.value);
  }
  $("prev").disabled = state.index === 0;
  $("next").disabled = state.index === state.cases.length - 1;
  $("submit").disabled = Object.keys(state.answers).length < state.cases.length;
}

function choose(answer) {
  if (state.busy) { return; }
  state.pending = answer; refreshButtons(); status("");
}

async function confidence(value) {
  if (state.busy) { return; }
  if (!state.pending) { status("choose real or synthetic first"); return; }
  state.busy = true;
  const id = state.cases[state.index];
  try {
    apply(await api("/api/answer", { reader: state.reader, token: state.token, case: id,
                                     answer: state.pending, confidence: value }));
  } catch (error) { status(error.message); state.busy = false; return; }
  status("saved");
  state.busy = false;
  if (state.index < state.cases.length - 1) { state.index += 1; await show(); } else { refreshButtons(); }
}

async function move(step) {
  if (state.busy) { return; }
  const next = state.index + step;
  if (next < 0 || next >= state.cases.length) { return; }
  state.index = next; await show();
}

async function submit() {
  try { apply(await api("/api/submit", { reader: state.reader, token: state.token })); }
  catch (error) { status(error.message); return; }
  $("reading").hidden = true; $("done").hidden = false; status("");
}

function adjust(id, factor) {
  const input = $(id), span = parseFloat(input.max) - parseFloat(input.min);
  input.value = parseFloat(input.value) + factor * span; draw();
}

document.addEventListener("DOMContentLoaded", async () => {
  $("start").addEventListener("click", async () => {
    const reader = $("reader-id").value.trim();
    try { await login(reader, newToken()); } catch (error) { status(error.message); }
  });
  for (const button of document.querySelectorAll("[data-answer]")) {
    button.addEventListener("click", () => choose(button.dataset.answer));
  }
  for (const button of document.querySelectorAll(".conf")) {
    button.addEventListener("click", () => confidence(parseInt(button.dataset.value, 10)));
  }
  $("prev").addEventListener("click", () => move(-1));
  $("next").addEventListener("click", () => move(1));
  $("submit").addEventListener("click", submit);
  $("outline").addEventListener("change", () => { state.outline = $("outline").checked; draw(); });
  $("window-width").addEventListener("input", draw);
  $("window-level").addEventListener("input", draw);
  document.addEventListener("keydown", (event) => {
    if ($("reading").hidden || event.target.tagName === "INPUT" && event.target.type !== "range") { return; }
    const key = event.key.toLowerCase();
    if (key === "r") { choose("real"); }
    else if (key === "s") { choose("synthetic"); }
    else if ("12345".includes(key) && key.length === 1) { confidence(parseInt(key, 10)); }
    else if (event.key === "ArrowLeft") { move(-1); }
    else if (event.key === "ArrowRight") { move(1); }
    else if (key === "o") { $("outline").checked = !$("outline").checked; state.outline = $("outline").checked; draw(); }
    else if (key === "[") { adjust("window-width", -0.05); }
    else if (key === "]") { adjust("window-width", 0.05); }
    else if (key === "-") { adjust("window-level", -0.02); }
    else if (key === "=") { adjust("window-level", 0.02); }
  });
  try {
    const study = await fetch("/api/study").then((r) => r.json());
    state.outline = !!study.outline; $("outline").checked = state.outline;
  } catch (error) { status("the study server does not answer"); }
  const reader = localStorage.getItem("reader"), token = localStorage.getItem("token");
  if (reader && token) {
    try { await login(reader, token); } catch (error) { status(error.message); }
  }
});
