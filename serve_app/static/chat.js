// The chat page: OpenAI chat streaming over fetch + ReadableStream, a Stop button that
// aborts the fetch (closing the connection is what makes the server cancel the engine's
// request), per-request time to first token and tok/s, and the app's /stats.
"use strict";

const STATS_PERIOD_MS = 2000;
const API_KEY_ITEM = "ray-tgi-api-key"; // localStorage: the key survives a reload
const $ = (id) => document.getElementById(id);

// An app with API keys (ingress.auth) needs one on every call but the page itself.
function authorized(headers = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

// The conversation so far, as OpenAI messages; a stopped answer is kept as it was cut.
let messages = [];
let controller = null; // the AbortController of the generation in flight, if any

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text; // never innerHTML: model output is untrusted text
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function showTiming(timing) {
  $("num-tokens").textContent = String(timing.numTokens);
  if (timing.firstAt !== null) {
    $("ttft").textContent = `${Math.round(timing.firstAt - timing.sentAt)} ms`;
  }
  // Decode rate: the tokens after the first over the time since the first arrived.
  const seconds = (timing.lastAt - timing.firstAt) / 1000;
  if (timing.numTokens > 1 && seconds > 0) {
    $("tok-per-s").textContent = ((timing.numTokens - 1) / seconds).toFixed(1);
  }
}

// An error body in TGI's shape ({error, error_type}) or OpenAI's ({error: {message}}).
async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    return typeof error === "string" ? error : error.message;
  } catch {
    return text || `HTTP ${response.status}`;
  }
}

// Yield the `data:` payload of each SSE event (events are separated by a blank line).
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data:")) yield line.slice(5).trim();
      }
    }
  }
}

async function send(prompt) {
  const conversation = messages; // "New chat" may replace `messages` while this streams
  conversation.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const answer = addMessage("assistant", "");
  const timing = { sentAt: performance.now(), firstAt: null, lastAt: null, numTokens: 0 };
  $("ttft").textContent = "–";
  $("tok-per-s").textContent = "–";
  $("num-tokens").textContent = "0";
  $("status").textContent = "waiting";
  controller = new AbortController();
  setBusy(true);
  const request = {
    model: $("model").value,
    messages: conversation,
    stream: true,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
  };
  let failed = false;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: authorized({ "Content-Type": "application/json" }),
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    $("status").textContent = "streaming";
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || chunk.error);
      const delta = chunk.choices?.[0]?.delta?.content;
      if (!delta) continue;
      timing.lastAt = performance.now();
      timing.firstAt ??= timing.lastAt;
      timing.numTokens += 1; // the engine streams one token per chunk
      answer.textContent += delta;
      answer.scrollIntoView({ block: "end" });
      showTiming(timing);
    }
    $("status").textContent = "done";
  } catch (error) {
    if (error.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      failed = true;
      answer.classList.add("error");
      answer.textContent += (answer.textContent ? "\n" : "") + `Error: ${error.message}`;
      $("status").textContent = "error";
    }
  } finally {
    controller = null;
    setBusy(false);
    if (failed) {
      conversation.pop(); // the question got no answer: ask it again rather than keep it
    } else {
      conversation.push({ role: "assistant", content: answer.textContent });
    }
  }
}

async function loadModels() {
  $("model").replaceChildren();
  $("key-error").textContent = "";
  const response = await fetch("v1/models", { headers: authorized() });
  if (response.status === 401) {
    $("key-error").textContent = "This app needs an API key: enter it above.";
    return;
  }
  if (!response.ok) throw new Error(await errorText(response));
  const body = await response.json();
  for (const model of body.data) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    $("model").appendChild(option);
  }
}

function statsCell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text ?? "–";
  if (className) td.className = className;
}

async function refreshStats() {
  try {
    const response = await fetch("stats", { headers: authorized() });
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    const rows = $("stats").tBodies[0];
    rows.replaceChildren();
    for (const model of body.models) {
      const row = rows.insertRow();
      row.dataset.model = model.name;
      statsCell(row, model.name);
      statsCell(row, String(model.running_replicas));
      statsCell(row, model.queued_requests?.toString(), "queued");
      statsCell(row, model.running_requests?.toString(), "running");
      // A local model directory's full path is long: its last part, the rest on hover.
      statsCell(row, model.model_id?.split("/").pop(), "model-id");
      row.cells[row.cells.length - 1].title = model.model_id ?? "";
    }
    $("stats-error").textContent = "";
  } catch (error) {
    $("stats-error").textContent = `stats: ${error.message}`;
  }
}

function init() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || controller) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", () => {
    controller?.abort();
    messages = [];
    $("messages").replaceChildren();
  });
  const showModelError = (error) => addMessage("error", `Could not list models: ${error.message}`);
  $("api-key").value = localStorage.getItem(API_KEY_ITEM) ?? "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(API_KEY_ITEM, $("api-key").value.trim());
    loadModels().catch(showModelError);
    refreshStats();
  });
  loadModels().catch(showModelError);
  refreshStats();
  setInterval(refreshStats, STATS_PERIOD_MS);
}

init();
