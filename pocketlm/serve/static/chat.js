// The pocketlm chat page: plain JavaScript, no build step, no CDN. It speaks the same OpenAI API as any
// client (/v1/models, /v1/chat/completions with stream: true) and keeps the conversation in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top-p", "max-tokens", "seed", "api-key"];
let history = JSON.parse(localStorage.getItem("pocketlm.history") || "[]");
let controller = null; // the running request's AbortController: the Stop button aborts it

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function show(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function save() {
  localStorage.setItem("pocketlm.history", JSON.stringify(history));
  for (const id of SETTINGS) localStorage.setItem("pocketlm." + id, $(id).value);
  localStorage.setItem("pocketlm.model", $("model").value);
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch { return response.status + " " + response.statusText; }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { show("error", "Could not list models: " + (await errorText(response))); return; }
  const models = (await response.json()).data.filter((m) => m.kind !== "embed");
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) select.add(new Option(m.id + (m.kind === "base" ? " (base)" : ""), m.id));
  const saved = localStorage.getItem("pocketlm.model");
  if (models.some((m) => m.id === saved)) select.value = saved;
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function send(text) {
  history.push({ role: "user", content: text });
  show("user", text);
  const bubble = show("assistant", "");
  bubble.dataset.state = "streaming";
  const messages = $("system").value.trim() ? [{ role: "system", content: $("system").value.trim() }, ...history] : history;
  const body = {
    model: $("model").value, messages, stream: true, stream_options: { include_usage: true },
    temperature: number("temperature"), top_p: number("top-p"), max_tokens: number("max-tokens"), seed: number("seed"),
  };
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false; $("status").textContent = "thinking…";
  let answer = "", usage = null, stopped = false;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop(); // an incomplete event waits for the rest
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) { answer += delta.content; bubble.textContent = answer; bubble.scrollIntoView({ block: "end" }); }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else { show("error", e.message); history.pop(); bubble.remove(); }
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
  if (!bubble.isConnected) { save(); $("status").textContent = ""; return; }
  bubble.dataset.state = stopped ? "stopped" : "done";
  history.push({ role: "assistant", content: answer });
  $("status").textContent = stopped ? "stopped" : usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : "";
  save();
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history = []; $("messages").innerHTML = ""; $("status").textContent = ""; save(); });
$("model").addEventListener("change", save);
for (const id of SETTINGS) {
  const saved = localStorage.getItem("pocketlm." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => { save(); if (id === "api-key") loadModels(); });
}
for (const m of history) show(m.role, m.content);
loadModels();
