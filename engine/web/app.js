// The browser client: microphone → WebRTC (POST /webrtc/offer) → the engine, and the engine's
// events (GET /webrtc/events/{sessionId}) → transcript, speaking indicators, latency readout.
// Plain JS, no build step. `window.voice` exposes the live state (events, audio levels) for
// automated checks and for anyone curious in the console.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const LEVEL_SPEAKING = 0.02; // RMS (full scale 1.0) above which a side counts as speaking
  const LEVEL_HISTORY = 3000; // level samples kept (every 50 ms: 150 s)
  const TURN_TEXT = {
    "listening": "Listening",
    "user-speaking": "You are speaking",
    "thinking": "Thinking…",
    "assistant-speaking": "Assistant speaking",
    "paused": "Paused for you",
  };
  const params = new URLSearchParams(location.search);
  // ?raw=1 turns the browser's echo cancellation, noise suppression and gain control off.
  const processing = params.get("raw") !== "1";

  const call = {
    active: false,
    pc: null,
    ws: null,
    stream: null,
    ctx: null,
    localAnalyser: null,
    remoteAnalyser: null,
    sessionId: null,
    partial: null, // the user's message being recognised
    lastAssistant: null,
    latencies: [],
    timer: null,
  };

  const voice = {
    events: [], // every event from the engine, with t = performance.now() at arrival
    levels: [], // {t, local, remote} every 50 ms while a call runs
    remoteLevel: () => rms(call.remoteAnalyser),
    localLevel: () => rms(call.localAnalyser),
    get sessionId() { return call.sessionId; },
    get active() { return call.active; },
    start: () => start(),
    stop: (why) => stop(why),
  };
  window.voice = voice;

  // -- helpers ------------------------------------------------------------------------------------

  const buffers = new WeakMap();
  function rms(analyser) {
    if (!analyser) return 0;
    let buf = buffers.get(analyser);
    if (!buf) {
      buf = new Float32Array(analyser.fftSize);
      buffers.set(analyser, buf);
    }
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (let i = 0; i < buf.length; i++) sum += buf[i] * buf[i];
    return Math.sqrt(sum / buf.length);
  }

  function setStatus(text) { $("status").textContent = text; }

  function showAlert(text) {
    const el = $("alert");
    el.textContent = text;
    el.hidden = !text;
  }

  function setButton(active, busy) {
    const btn = $("call");
    btn.setAttribute("aria-pressed", active ? "true" : "false");
    $("call-label").textContent = active ? "Stop" : "Start";
    btn.disabled = !!busy;
  }

  function micError(err) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
      return "Microphone access was refused. Allow it for this site (the microphone icon in the " +
        "address bar, or the site settings) and press Start again.";
    }
    if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") {
      return "No microphone was found. Connect one, then press Start again.";
    }
    if (name === "NotReadableError" || name === "TrackStartError") {
      return "The microphone is busy or unavailable (another app may be using it).";
    }
    return `The microphone could not be opened: ${(err && err.message) || err}`;
  }

  function analyserFor(stream) {
    const source = call.ctx.createMediaStreamSource(stream);
    const analyser = call.ctx.createAnalyser();
    analyser.fftSize = 1024;
    source.connect(analyser); // not to the speakers: the <audio> element plays the remote side
    return analyser;
  }

  function waitForIce(pc, ms) {
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const timer = setTimeout(resolve, ms);
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  }

  // -- the call -----------------------------------------------------------------------------------

  let configPromise = null;
  function loadConfig() {
    // The engine's ICE servers and the assistant's name; host candidates alone serve the same
    // machine and the LAN, so a failure here is not fatal.
    if (!configPromise) {
      configPromise = fetch("/webrtc/config")
        .then((res) => (res.ok ? res.json() : {}))
        .catch(() => ({}))
        .then((config) => {
          if (config.assistant) {
            $("name").textContent = config.assistant;
            document.title = config.assistant;
          }
          return config;
        });
    }
    return configPromise;
  }

  async function start() {
    if (call.active) return;
    showAlert("");
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showAlert("The microphone needs a secure page: open this over https://, or as " +
        "http://localhost on the machine running the engine.");
      return;
    }
    setButton(true, true);
    setStatus("Asking for the microphone…");
    try {
      call.stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: processing, noiseSuppression: processing, autoGainControl: processing },
      });
    } catch (err) {
      setButton(false, false);
      setStatus("Press Start and allow the microphone.");
      showAlert(micError(err));
      return;
    }
    call.active = true;
    voice.events.length = 0;
    voice.levels.length = 0;
    try {
      call.ctx = new AudioContext();
      if (call.ctx.state === "suspended") await call.ctx.resume();
      call.localAnalyser = analyserFor(call.stream);
      setStatus("Connecting…");
      const config = await loadConfig();
      const pc = new RTCPeerConnection({ iceServers: config.iceServers || [] });
      call.pc = pc;
      for (const track of call.stream.getAudioTracks()) pc.addTrack(track, call.stream);
      pc.ontrack = (event) => {
        const stream = event.streams[0] || new MediaStream([event.track]);
        $("remote").srcObject = stream; // Chrome only feeds WebAudio from a remote stream that plays
        call.remoteAnalyser = analyserFor(stream);
      };
      pc.onconnectionstatechange = () => {
        const state = pc.connectionState;
        if (state === "connected") setStatus("Connected. Say something.");
        else if (state === "failed") fail("The connection to the engine failed.");
        else if (state === "disconnected") setStatus("Connection interrupted…");
      };
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIce(pc, 3000);
      const res = await fetch("/webrtc/offer", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
      });
      const body = await res.json().catch(() => ({}));
      if (!res.ok) throw new Error(body.error || `the engine answered ${res.status}`);
      if (!call.active) return; // stopped while connecting
      call.sessionId = body.sessionId;
      await pc.setRemoteDescription({ type: "answer", sdp: body.sdp });
      openEvents(body.sessionId);
      call.timer = setInterval(sampleLevels, 50);
      setButton(true, false);
    } catch (err) {
      fail(`Could not start the call: ${err.message || err}`);
    }
  }

  function openEvents(sessionId) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/webrtc/events/${encodeURIComponent(sessionId)}`);
    call.ws = ws;
    ws.onmessage = (msg) => {
      let event;
      try { event = JSON.parse(msg.data); } catch (_) { return; }
      onEvent(event);
    };
    ws.onclose = () => {
      if (call.ws === ws && call.active) stop("The engine ended the call.");
    };
  }

  function stop(why) {
    const wasActive = call.active;
    call.active = false;
    if (call.timer) clearInterval(call.timer);
    call.timer = null;
    const ws = call.ws;
    call.ws = null;
    if (ws) {
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "hangup" }));
      ws.close();
    }
    if (call.pc) call.pc.close();
    call.pc = null;
    if (call.stream) call.stream.getTracks().forEach((t) => t.stop());
    call.stream = null;
    if (call.ctx) call.ctx.close();
    call.ctx = null;
    call.localAnalyser = call.remoteAnalyser = null;
    $("remote").srcObject = null;
    speaking("who-user", 0);
    speaking("who-assistant", 0);
    $("turn").textContent = "Idle";
    setButton(false, false);
    if (wasActive) setStatus(why || "Call ended. Press Start to talk again.");
  }

  function fail(text) {
    stop("Press Start to try again.");
    showAlert(text);
  }

  // -- what the engine tells the page ---------------------------------------------------------------

  function onEvent(event) {
    voice.events.push(Object.assign({ t: performance.now() }, event));
    switch (event.type) {
      case "transcript":
        if (event.role === "user") userText(event.text, event.final);
        else if (event.final && (!call.lastAssistant || call.lastAssistant.dataset.text !== event.text)) {
          assistantText(event.text);
        }
        break;
      case "assistant":
        assistantText(event.text);
        break;
      case "turn":
        $("turn").textContent = TURN_TEXT[event.state] || event.state;
        break;
      case "barge-in":
        if (event.step === "cancelled" && call.lastAssistant) call.lastAssistant.classList.add("interrupted");
        break;
      case "latency":
        call.latencies.push(event.responseMs);
        $("latency").textContent = `${Math.round(event.responseMs)} ms`;
        if (call.latencies.length > 1) {
          const avg = call.latencies.reduce((a, b) => a + b, 0) / call.latencies.length;
          $("latency-avg").textContent = `(average ${Math.round(avg)} ms over ${call.latencies.length})`;
        }
        break;
      case "stats":
        $("net").textContent = `Audio in: ${event.framesIn} frames` +
          (event.concealed !== undefined ? `, ${event.concealed} concealed, jitter ${event.jitterMs} ms` : "") +
          `, longest gap ${event.maxStallMs} ms`;
        break;
      case "transfer":
        note(event.state === "failed" ? "The assistant could not transfer this call." : `Transfer: ${event.state}`);
        break;
      case "agent-requested":
        note("Connecting you to an agent. Please stay on the line.");
        $("turn").textContent = "Connecting you to an agent";
        break;
      case "error":
        showAlert(event.message || "The engine reported an error.");
        break;
      case "end":
        stop(`Call ended (${event.reason}). Press Start to talk again.`);
        break;
      default:
        break;
    }
  }

  function transcriptBox() {
    const box = $("transcript");
    const empty = $("empty");
    if (empty) empty.remove();
    return box;
  }

  function message(role) {
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role === "user" ? "You" : "Assistant";
    const text = document.createElement("span");
    text.className = "text";
    el.append(label, text);
    transcriptBox().append(el);
    return el;
  }

  function scrollDown() {
    const box = $("transcript");
    box.scrollTop = box.scrollHeight;
  }

  function userText(text, final) {
    if (!text) return;
    let el = call.partial;
    if (!el) {
      el = message("user");
      call.partial = el;
    }
    el.querySelector(".text").textContent = text;
    el.classList.toggle("partial", !final);
    el.classList.toggle("final", !!final);
    if (final) call.partial = null;
    scrollDown();
  }

  function assistantText(text) {
    const el = message("assistant");
    el.dataset.text = text;
    el.querySelector(".text").textContent = text;
    call.lastAssistant = el;
    scrollDown();
  }

  function note(text) {
    const el = document.createElement("p");
    el.className = "note";
    el.textContent = text;
    transcriptBox().append(el);
    scrollDown();
  }

  // -- speaking indicators --------------------------------------------------------------------------

  function speaking(id, level) {
    $(id).classList.toggle("speaking", level > LEVEL_SPEAKING);
    const bar = $(id === "who-user" ? "bar-user" : "bar-assistant");
    bar.style.width = `${Math.min(100, Math.round(Math.sqrt(level) * 250))}%`;
  }

  function sampleLevels() {
    const local = rms(call.localAnalyser);
    const remote = rms(call.remoteAnalyser);
    voice.levels.push({ t: performance.now(), local, remote });
    if (voice.levels.length > LEVEL_HISTORY) voice.levels.splice(0, voice.levels.length - LEVEL_HISTORY);
    speaking("who-user", local);
    speaking("who-assistant", remote);
  }

  $("call").addEventListener("click", () => (call.active ? stop() : start()));
  loadConfig();
  window.addEventListener("pagehide", () => { if (call.active) stop(); });
})();
