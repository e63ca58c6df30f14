// The draw-a-digit page: pointer events draw on the canvas; while drawing, the canvas is sent
// as a PNG to POST /api/predict at most every DELAY ms (and once more when the stroke ends);
// the answer fills ten bars. body[data-state] is "busy" until the last answer is shown, then
// "idle" (the browser test waits for it).
"use strict";

const DELAY = 150; // ms between predictions while drawing
const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const seen = document.getElementById("seen").getContext("2d");
const bars = document.getElementById("bars");
const topClass = document.getElementById("top-class");
const topProb = document.getElementById("top-prob");
const status = document.getElementById("status");
const upload = document.getElementById("upload");

let labels = [];
let hasInk = false;
let stroke = null; // {id, x, y} of the pointer drawing now
let timer = null;
let inFlight = false;
let again = false; // the canvas changed while a request was in flight
let generation = 0; // bumped by Clear: answers for an older drawing are dropped

// -- drawing -----------------------------------------------------------------------------------

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.strokeStyle = ctx.fillStyle = "#000";
  ctx.lineWidth = pad.width / 10; // about MNIST's stroke once the digit is scaled to 20 px
  ctx.lineCap = ctx.lineJoin = "round";
}

function at(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * pad.width) / box.width,
    y: ((event.clientY - box.top) * pad.height) / box.height,
  };
}

pad.addEventListener("pointerdown", (event) => {
  if (stroke || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  const p = at(event);
  stroke = { id: event.pointerId, ...p };
  ctx.beginPath();
  ctx.arc(p.x, p.y, ctx.lineWidth / 2, 0, 2 * Math.PI);
  ctx.fill();
  hasInk = true;
  schedule();
});

pad.addEventListener("pointermove", (event) => {
  if (!stroke || event.pointerId !== stroke.id) return;
  const points = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  ctx.beginPath();
  ctx.moveTo(stroke.x, stroke.y);
  for (const e of points.length ? points : [event]) {
    const p = at(e);
    ctx.lineTo(p.x, p.y);
    stroke.x = p.x;
    stroke.y = p.y;
  }
  ctx.stroke();
  schedule();
});

for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
  pad.addEventListener(type, (event) => {
    if (!stroke || event.pointerId !== stroke.id) return;
    stroke = null;
    schedule(0);
  });
}

document.getElementById("clear").addEventListener("click", () => {
  generation += 1;
  clearTimeout(timer);
  timer = null;
  again = false;
  clearPad();
  hasInk = false;
  showEmpty();
  setState();
});

// -- uploads (the file input, or a file dropped on the canvas) ---------------------------------

upload.addEventListener("change", () => {
  if (upload.files.length) useFile(upload.files[0]);
  upload.value = ""; // choosing the same file again fires change again
});
pad.addEventListener("dragover", (event) => {
  event.preventDefault();
  pad.classList.add("dropping");
});
pad.addEventListener("dragleave", () => pad.classList.remove("dropping"));
pad.addEventListener("drop", (event) => {
  event.preventDefault();
  pad.classList.remove("dropping");
  if (event.dataTransfer.files.length) useFile(event.dataTransfer.files[0]);
});

async function useFile(file) {
  generation += 1;
  clearPad();
  hasInk = true;
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(file);
    const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
    const w = bitmap.width * scale, h = bitmap.height * scale;
    ctx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  } catch (error) {
    // Not decodable here: the server still says what is wrong with it.
  }
  if (file.type === "image/png" || file.type === "image/jpeg") {
    request(file, file.type); // the file itself, so the answer equals `fastconv predict FILE`
  } else if (bitmap) {
    request(await canvasPng(), "image/png"); // other formats: as the browser decoded them
  } else {
    fail(`${file.name}: not an image this page can read (PNG or JPEG)`);
  }
}

// -- predictions -------------------------------------------------------------------------------

function schedule(delay = DELAY) {
  if (timer !== null) {
    if (delay > 0) return; // one request per DELAY while the stroke goes on
    clearTimeout(timer);
  }
  document.body.dataset.state = "busy";
  timer = setTimeout(() => {
    timer = null;
    if (inFlight) again = true;
    else if (hasInk) canvasPng().then((png) => request(png, "image/png"));
    else setState();
  }, delay);
}

function canvasPng() {
  return new Promise((resolve) => pad.toBlob(resolve, "image/png"));
}

async function request(body, type) {
  const mine = generation;
  inFlight = true;
  document.body.dataset.state = "busy";
  try {
    const response = await fetch("/api/predict", {
      method: "POST",
      headers: { "Content-Type": type },
      body,
    });
    const answer = await response.json().catch(() => ({}));
    if (mine !== generation) return;
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    show(answer);
  } catch (error) {
    if (mine === generation) fail(error.message || String(error));
  } finally {
    inFlight = false;
    if (again) {
      again = false;
      schedule(0);
    }
    setState();
  }
}

function setState() {
  document.body.dataset.state = timer !== null || inFlight || again ? "busy" : "idle";
}

function show(answer) {
  const probabilities = answer.probabilities;
  bars.querySelectorAll("li").forEach((item, i) => {
    const p = probabilities[i] ?? 0;
    item.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    item.querySelector(".value").textContent = `${(100 * p).toFixed(1)}%`;
    item.classList.toggle("best", i === answer.class);
  });
  topClass.textContent = answer.label;
  topClass.classList.toggle("long", answer.label.length > 2);
  topProb.textContent = `${(100 * probabilities[answer.class]).toFixed(1)}% sure`;
  drawInput(answer.input);
  status.textContent = answer.time_ms !== undefined ? `answered in ${answer.time_ms} ms` : "";
  status.classList.remove("error");
  document.body.dataset.prediction = answer.label;
}

function showEmpty() {
  bars.querySelectorAll("li").forEach((item) => {
    item.querySelector(".fill").style.width = "0";
    item.querySelector(".value").textContent = "";
    item.classList.remove("best");
  });
  topClass.textContent = "–";
  topClass.classList.remove("long");
  topProb.textContent = "draw something";
  seen.clearRect(0, 0, 28, 28);
  status.textContent = "";
  status.classList.remove("error");
  delete document.body.dataset.prediction;
}

function fail(message) {
  status.textContent = message;
  status.classList.add("error");
}

function drawInput(pixels) {
  if (!Array.isArray(pixels) || !pixels.length) return;
  const h = pixels.length, w = pixels[0].length;
  seen.canvas.width = w;
  seen.canvas.height = h;
  const image = seen.createImageData(w, h);
  pixels.flat().forEach((v, i) => {
    const g = Math.round(255 * v);
    image.data.set([g, g, g, 255], 4 * i);
  });
  seen.putImageData(image, 0, 0);
}

// -- start -------------------------------------------------------------------------------------

function buildBars() {
  bars.replaceChildren(
    ...labels.map((label) => {
      const item = document.createElement("li");
      item.innerHTML =
        '<span class="name"></span><span class="track"><span class="fill"></span></span>' +
        '<span class="value"></span>';
      item.querySelector(".name").textContent = label;
      item.querySelector(".fill").style.display = "block";
      return item;
    }),
  );
}

async function start() {
  clearPad();
  document.body.dataset.state = "busy";
  try {
    const response = await fetch("/api/model");
    const model = await response.json();
    labels = model.classes;
    const arch = model.meta && model.meta.architecture ? `${model.meta.architecture}, ` : "";
    const accuracy =
      model.meta && model.meta.test_accuracy !== undefined
        ? `, ${(100 * model.meta.test_accuracy).toFixed(2)}% on the test set`
        : "";
    document.getElementById("model-name").textContent =
      `${model.name}: ${arch}${model.parameters.toLocaleString()} parameters${accuracy}`;
    document.getElementById("model-info").textContent =
      `${labels.length} classes · input ${model.input_shape.join("×")}`;
  } catch (error) {
    labels = [...Array(10).keys()].map(String);
    fail(`cannot read the model description: ${error.message}`);
  }
  buildBars();
  showEmpty();
  setState();
}

start();
