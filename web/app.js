// Switchboard web client: plain ES module, no build step.
// Speaks docs/SIGNALING.md over /ws. One RTCPeerConnection per session;
// perfect negotiation with this side polite (the server is impolite).

const $ = (id) => document.getElementById(id);
const ROOM_RE = /^[A-Za-z0-9._-]{1,64}$/;

const state = {
  room: null,
  name: null,
  me: null,            // participant id
  ws: null,
  pc: null,
  roster: [],
  local: null,         // MediaStream (camera + mic)
  screen: null,        // MediaStream of the screen share
  screenTx: null,      // transceiver used for the screen
  sources: new Map(),  // our transceiver mid -> source
  offered: new Map(),  // server m-line mid -> { participant, track }, from its last offer
  remote: new Map(),   // track id -> MediaStreamTrack
  micMuted: false,
  camOff: false,
  makingOffer: false,
  phase: 'lobby',      // lobby | connecting | connected | reconnecting | left
  retries: 0,
  retryTimer: null,
  chatUnread: 0,
  errors: [],
};
window.__sb = state; // for tests and debugging

// ---------- lobby ----------

function roomFromPath() {
  const m = location.pathname.match(/^\/r\/([^/]+)$/);
  return m ? decodeURIComponent(m[1]) : '';
}

function setConn(s, text) {
  $('conn').dataset.state = s;
  $('conn-text').textContent = text;
}

async function listDevices() {
  try {
    const devs = await navigator.mediaDevices.enumerateDevices();
    for (const [sel, kind] of [[$('cam-select'), 'videoinput'], [$('mic-select'), 'audioinput']]) {
      const keep = sel.value;
      sel.length = 1;
      devs.filter((d) => d.kind === kind && d.deviceId).forEach((d, i) => {
        const o = document.createElement('option');
        o.value = d.deviceId;
        o.textContent = d.label || `${kind === 'videoinput' ? 'Camera' : 'Microphone'} ${i + 1}`;
        sel.append(o);
      });
      sel.value = keep;
    }
  } catch { /* no devices: receive-only */ }
}

async function openMedia() {
  const cam = $('cam-select').value;
  const mic = $('mic-select').value;
  const want = {
    video: cam ? { deviceId: { exact: cam } } : { width: { ideal: 1280 }, height: { ideal: 720 } },
    audio: mic ? { deviceId: { exact: mic } } : true,
  };
  for (const c of [want, { audio: want.audio }, { video: want.video }]) {
    try { return await navigator.mediaDevices.getUserMedia(c); } catch { /* try less */ }
  }
  return new MediaStream(); // no camera or mic: join receive-only
}

// The camera/mic being opened for the lobby preview. Joining waits for it:
// a quick click on "Join" must not enter the call without media.
let previewing = Promise.resolve();

function startPreview() {
  previewing = preview();
  return previewing;
}

async function preview() {
  if (state.local) state.local.getTracks().forEach((t) => t.stop());
  state.local = await openMedia();
  $('preview').srcObject = state.local;
  $('preview-empty').hidden = state.local.getVideoTracks().length > 0;
  listDevices();
}

function initLobby() {
  const room = roomFromPath();
  $('room').value = room || localStorage.getItem('sb.room') || '';
  $('name').value = localStorage.getItem('sb.name') || '';
  $('room-label').textContent = room ? `Room ${room}` : '';
  $('cam-select').onchange = startPreview;
  $('mic-select').onchange = startPreview;
  $('join-form').onsubmit = (e) => {
    e.preventDefault();
    const r = $('room').value.trim();
    const n = $('name').value.trim();
    if (!ROOM_RE.test(r)) return showJoinError('Room names are 1–64 letters, digits, ".", "_" or "-".');
    if (!n || [...n].length > 64) return showJoinError('Your name must be 1–64 characters.');
    localStorage.setItem('sb.room', r);
    localStorage.setItem('sb.name', n);
    if (roomFromPath() !== r) history.pushState({}, '', `/r/${encodeURIComponent(r)}`);
    state.room = r;
    state.name = n;
    $('join-btn').disabled = true;
    previewing.finally(() => {
      $('join-btn').disabled = false;
      enterCall();
    });
  };
  startPreview();
}

function showJoinError(msg) { $('join-error').textContent = msg; }

// ---------- session ----------

function enterCall() {
  $('lobby').hidden = true;
  $('left').hidden = true;
  $('call').hidden = false;
  $('controls').hidden = false;
  $('room-label').textContent = `Room ${state.room}`;
  document.title = `${state.room} · Switchboard`;
  state.retries = 0;
  connect();
}

function connect() {
  clearTimeout(state.retryTimer);
  state.phase = state.phase === 'reconnecting' ? 'reconnecting' : 'connecting';
  setConn(state.phase, state.phase === 'reconnecting' ? 'Reconnecting…' : 'Connecting…');
  const proto = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${proto}://${location.host}/ws`);
  state.ws = ws;
  ws.onopen = () => send({ type: 'join', room: state.room, name: state.name });
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    onMessage(msg).catch((e) => console.error('signaling', e));
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    closePc();
    if (state.phase === 'left' || state.fatal) return;
    state.phase = 'reconnecting';
    const delay = Math.min(10000, 500 * 2 ** state.retries++);
    setConn('reconnecting', `Reconnecting in ${Math.round(delay / 1000)} s…`);
    banner('Connection lost. Reconnecting…');
    state.retryTimer = setTimeout(connect, delay);
  };
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
}

const ERROR_TEXT = {
  full: 'This room is full.',
  invalid_room: 'That room name is not valid.',
  invalid_name: 'That name is not valid.',
  shutting_down: 'The server is restarting.',
  disconnected: 'Your media connection was lost.',
  rate_limited: 'Slow down: too many messages.',
  chat_too_long: 'That message is too long.',
};

async function onMessage(msg) {
  switch (msg.type) {
    case 'joined':
      state.me = msg.participant_id;
      state.retries = 0;
      banner(null);
      startPc();
      break;
    case 'roster':
      state.roster = msg.participants;
      render();
      break;
    case 'offer': await onServerOffer(msg.sdp, msg.tracks || []); break;
    case 'answer': await onServerAnswer(msg.sdp); break;
    case 'chat': addChat(msg); break;
    case 'pong': break;
    case 'error': onError(msg); break;
  }
}

function onError(msg) {
  state.errors.push(msg);
  console.warn('server error', msg.code, msg.message);
  const text = ERROR_TEXT[msg.code] || msg.message;
  if (msg.code === 'full' || msg.code === 'invalid_room' || msg.code === 'invalid_name') {
    state.fatal = true;
    leaveUi('Could not join', text);
  } else {
    banner(text, true);
  }
}

// ---------- WebRTC ----------

function startPc() {
  closePc();
  const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
  state.pc = pc;
  state.sources.clear();
  state.remote.clear();
  state.screenTx = null;
  pc.createDataChannel('sb'); // always at least one m-line, even receive-only
  for (const t of state.local ? state.local.getTracks() : []) {
    const tx = pc.addTransceiver(t, { direction: 'sendonly', streams: [state.local] });
    tx.sb_source = t.kind === 'audio' ? 'microphone' : 'camera';
  }
  if (state.screen) addScreenTransceiver();
  pc.onnegotiationneeded = () => offer().catch((e) => console.error('offer', e));
  pc.ontrack = (ev) => onTrack(ev);
  pc.onconnectionstatechange = () => {
    const s = pc.connectionState;
    if (s === 'connected') { state.phase = 'connected'; setConn('connected', 'Connected'); }
    else if (s === 'failed') {
      setConn('error', 'Media failed');
      // Firefox never uses loopback candidates: a node on 127.0.0.1 is
      // unreachable for it (see docs/ARCHITECTURE.md, Measured facts).
      if (/firefox/i.test(navigator.userAgent) && /^(127\.|localhost$|\[::1\]$)/.test(location.hostname)) {
        banner('Firefox does not send WebRTC media to a server on 127.0.0.1. Use Chromium for a node on this machine, or reach the node on a non-loopback address (see the README).', true);
      }
    }
    else if (s === 'connecting' || s === 'new') { setConn('connecting', 'Connecting media…'); }
  };
  applyMute();
}

function closePc() {
  if (state.pc) {
    state.pc.onnegotiationneeded = null;
    state.pc.close();
    state.pc = null;
  }
  state.remote.clear();
}

function trackList(pc) {
  const tracks = [];
  for (const tx of pc.getTransceivers()) {
    if (tx.mid && tx.sb_source && (tx.direction === 'sendonly' || tx.direction === 'sendrecv')) {
      tracks.push({ mid: tx.mid, source: tx.sb_source });
    }
  }
  return tracks;
}

async function offer() {
  const pc = state.pc;
  if (!pc || !state.me) return;
  state.makingOffer = true;
  try {
    await pc.setLocalDescription();
    if (pc !== state.pc || pc.signalingState !== 'have-local-offer') return;
    send({ type: 'offer', sdp: pc.localDescription.sdp, tracks: trackList(pc) });
  } finally {
    state.makingOffer = false;
  }
}

async function onServerOffer(sdp, tracks) {
  const pc = state.pc;
  if (!pc) return;
  // Polite: a colliding offer of ours is rolled back by setRemoteDescription.
  await pc.setRemoteDescription({ type: 'offer', sdp });
  // What each of the server's m-lines carries is its offer's `tracks`, not
  // the SDP's a=msid: the m-line of a departed track is reused for the
  // next track of its kind and keeps the msid it was made with.
  state.offered = new Map(tracks.map((t) => [t.mid, { participant: t.participant, track: t.track }]));
  await pc.setLocalDescription();
  send({ type: 'answer', sdp: pc.localDescription.sdp });
  placeTracks();
}

async function onServerAnswer(sdp) {
  const pc = state.pc;
  if (!pc || pc.signalingState !== 'have-local-offer') return;
  await pc.setRemoteDescription({ type: 'answer', sdp });
}

function onTrack(ev) {
  ev.track.sb_mid = ev.transceiver.mid;
  placeTracks(ev);
}

function placeTracks() {
  const pc = state.pc;
  if (!pc) return;
  const ids = state.offered;
  state.remote.clear();
  for (const tx of pc.getTransceivers()) {
    if (!tx.mid || tx.sb_source) continue;
    const id = ids.get(tx.mid);
    if (id && tx.receiver && tx.receiver.track && tx.currentDirection !== 'inactive' && !tx.stopped) {
      state.remote.set(id.track, tx.receiver.track);
    }
  }
  render();
}

// ---------- local controls ----------

function applyMute() {
  if (state.local) {
    state.local.getAudioTracks().forEach((t) => { t.enabled = !state.micMuted; });
    state.local.getVideoTracks().forEach((t) => { t.enabled = !state.camOff; });
  }
  send({ type: 'mute', audio: state.micMuted, video: state.camOff });
  setToggle($('mic-btn'), state.micMuted, 'Unmute', 'Mute');
  setToggle($('cam-btn'), state.camOff, 'Camera on', 'Camera off');
}

function setToggle(btn, on, onLabel, offLabel) {
  btn.setAttribute('aria-pressed', String(on));
  btn.querySelector('.lbl').textContent = on ? onLabel : offLabel;
}

function addScreenTransceiver() {
  const track = state.screen.getVideoTracks()[0];
  if (state.screenTx && !state.screenTx.stopped) {
    state.screenTx.direction = 'sendonly';
    state.screenTx.sender.replaceTrack(track);
  } else {
    state.screenTx = state.pc.addTransceiver(track, { direction: 'sendonly', streams: [state.screen] });
    state.screenTx.sb_source = 'screen';
  }
}

async function toggleScreen() {
  if (state.screen) return stopScreen();
  try {
    state.screen = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
  } catch {
    return banner('Screen sharing was not allowed.', true);
  }
  state.screen.getVideoTracks()[0].onended = stopScreen;
  if (state.pc) addScreenTransceiver();
  setToggle($('screen-btn'), true, 'Stop sharing', 'Share screen');
  render();
}

function stopScreen() {
  if (!state.screen) return;
  state.screen.getTracks().forEach((t) => t.stop());
  state.screen = null;
  if (state.screenTx && state.pc) {
    state.screenTx.sender.replaceTrack(null);
    state.screenTx.direction = 'inactive';
  }
  setToggle($('screen-btn'), false, 'Stop sharing', 'Share screen');
  render();
}

function leave() {
  send({ type: 'leave' });
  state.phase = 'left';
  if (state.ws) state.ws.close();
  closePc();
  stopScreen();
  leaveUi('You left the call', `Room ${state.room}`);
}

function leaveUi(title, text) {
  state.phase = 'left';
  clearTimeout(state.retryTimer);
  $('call').hidden = true;
  $('controls').hidden = true;
  $('lobby').hidden = true;
  $('left').hidden = false;
  $('left-title').textContent = title;
  $('left-text').textContent = text;
  setConn('idle', 'Not connected');
  $('grid').replaceChildren();
}

// ---------- rendering ----------

function banner(text, isError = false) {
  const b = $('banner');
  b.hidden = !text;
  b.textContent = text || '';
  b.classList.toggle('error', isError);
  if (text && isError) setTimeout(() => { if (b.textContent === text) b.hidden = true; }, 5000);
}

function initials(name) {
  return [...name.trim()].slice(0, 1).join('').toUpperCase() || '?';
}

function tileFor(key) {
  let el = document.querySelector(`.tile[data-key="${CSS.escape(key)}"]`);
  if (!el) {
    el = document.createElement('div');
    el.className = 'tile';
    el.dataset.key = key;
    el.innerHTML = '<video autoplay playsinline></video><div class="avatar"><span></span></div><div class="label"><svg class="mic-off" hidden viewBox="0 0 24 24" aria-label="muted"><rect x="9" y="3" width="6" height="11" rx="3"/><path d="M5 11a7 7 0 0 0 14 0M12 18v3M4 4l16 16"/></svg><span class="name"></span></div>';
    $('grid').append(el);
  }
  return el;
}

function setVideo(el, stream, muted) {
  const v = el.querySelector('video');
  v.muted = muted;
  if (v.srcObject !== stream) v.srcObject = stream;
  const hasVideo = stream && stream.getVideoTracks().some((t) => t.readyState === 'live');
  el.querySelector('.avatar').hidden = hasVideo;
}

function render() {
  const keep = new Set();
  for (const p of state.roster) {
    const self = p.id === state.me;
    const key = `p:${p.id}`;
    keep.add(key);
    const el = tileFor(key);
    el.classList.toggle('self', self);
    el.dataset.participantId = p.id;
    el.dataset.name = p.name;
    el.querySelector('.name').textContent = self ? `${p.name} (you)` : p.name;
    el.querySelector('.avatar span').textContent = initials(p.name);
    el.querySelector('.mic-off').toggleAttribute('hidden', !p.audio_muted);
    let stream;
    if (self) {
      stream = state.local;
    } else {
      const tracks = p.tracks.filter((t) => t.source === 'camera' || t.source === 'microphone' || t.source === 'unknown')
        .map((t) => state.remote.get(t.id)).filter(Boolean);
      stream = el.sb_stream && sameTracks(el.sb_stream, tracks) ? el.sb_stream : new MediaStream(tracks);
      el.sb_stream = stream;
      el.dataset.tracks = tracks.map((t) => t.kind).sort().join(',');
    }
    setVideo(el, stream, self);
    if (p.video_muted) el.querySelector('.avatar').hidden = false;
    for (const t of p.tracks.filter((t) => t.source === 'screen')) {
      const skey = `s:${t.id}`;
      const track = self ? (state.screen && state.screen.getVideoTracks()[0]) : state.remote.get(t.id);
      if (!track) continue;
      keep.add(skey);
      const s = tileFor(skey);
      s.classList.add('screen');
      s.dataset.participantId = p.id;
      s.dataset.screen = 'true';
      s.querySelector('.name').textContent = `${p.name} · screen`;
      if (!s.sb_stream || !sameTracks(s.sb_stream, [track])) s.sb_stream = new MediaStream([track]);
      setVideo(s, s.sb_stream, true);
    }
  }
  for (const el of [...document.querySelectorAll('.tile')]) {
    if (!keep.has(el.dataset.key)) el.remove();
  }
}

function sameTracks(stream, tracks) {
  const a = stream.getTracks();
  return a.length === tracks.length && tracks.every((t) => a.includes(t));
}

// ---------- chat ----------

function addChat(msg) {
  const li = document.createElement('li');
  const when = new Date(msg.ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  li.innerHTML = '<div><span class="who"></span><span class="when"></span></div><div class="text"></div>';
  li.querySelector('.who').textContent = msg.from === state.me ? 'You' : msg.name;
  li.querySelector('.when').textContent = when;
  li.querySelector('.text').textContent = msg.text;
  $('chat-log').append(li);
  li.scrollIntoView({ block: 'end' });
  if ($('chat').classList.contains('closed')) {
    state.chatUnread++;
    $('chat-badge').hidden = false;
    $('chat-badge').textContent = String(state.chatUnread);
  }
}

// ---------- switching devices during a call ----------

function fillCallDevices() {
  for (const [from, to] of [['cam-select', 'cam-select-call'], ['mic-select', 'mic-select-call']]) {
    $(to).replaceChildren(...[...$(from).options].map((o) => o.cloneNode(true)));
    const cur = state.local && (to.startsWith('cam') ? state.local.getVideoTracks() : state.local.getAudioTracks())[0];
    const id = cur && cur.getSettings().deviceId;
    if (id && [...$(to).options].some((o) => o.value === id)) $(to).value = id;
  }
}

async function switchDevice(kind, deviceId) {
  const c = kind === 'video' ? { video: deviceId ? { deviceId: { exact: deviceId } } : true }
    : { audio: deviceId ? { deviceId: { exact: deviceId } } : true };
  let fresh;
  try { fresh = await navigator.mediaDevices.getUserMedia(c); } catch {
    return banner('That device could not be opened.', true);
  }
  const track = kind === 'video' ? fresh.getVideoTracks()[0] : fresh.getAudioTracks()[0];
  const old = kind === 'video' ? state.local.getVideoTracks()[0] : state.local.getAudioTracks()[0];
  if (old) { state.local.removeTrack(old); old.stop(); }
  state.local.addTrack(track);
  const src = kind === 'video' ? 'camera' : 'microphone';
  const tx = state.pc && state.pc.getTransceivers().find((t) => t.sb_source === src);
  if (tx) await tx.sender.replaceTrack(track);
  else if (state.pc) {
    const t = state.pc.addTransceiver(track, { direction: 'sendonly', streams: [state.local] });
    t.sb_source = src;
  }
  (kind === 'video' ? $('cam-select') : $('mic-select')).value = deviceId;
  applyMute();
  render();
}

// ---------- wiring ----------

$('mic-btn').onclick = () => { state.micMuted = !state.micMuted; applyMute(); render(); };
$('cam-btn').onclick = () => { state.camOff = !state.camOff; applyMute(); render(); };
$('screen-btn').onclick = toggleScreen;
$('dev-btn').onclick = async () => {
  await listDevices();
  fillCallDevices();
  $('devices').hidden = !$('devices').hidden;
};
$('cam-select-call').onchange = (e) => switchDevice('video', e.target.value);
$('mic-select-call').onchange = (e) => switchDevice('audio', e.target.value);
$('leave-btn').onclick = leave;
$('chat-btn').onclick = () => {
  $('chat').classList.toggle('closed');
  state.chatUnread = 0;
  $('chat-badge').hidden = true;
};
$('chat-form').onsubmit = (e) => {
  e.preventDefault();
  const text = $('chat-input').value.trim();
  if (!text) return;
  send({ type: 'chat', text });
  $('chat-input').value = '';
};
$('rejoin').onclick = () => {
  state.fatal = false;
  state.phase = 'lobby';
  if (!state.room) { location.href = '/'; return; }
  startPreview().then(enterCall);
};
setInterval(() => send({ type: 'ping' }), 15000);
window.addEventListener('popstate', () => location.reload());

// ---------- layout ----------

// Size tiles so every video is as large as the stage allows at 16:9 (as
// Meet or Jitsi do), instead of stretching a few tiles to the full height.
// A screen share takes a 2×2 block (four slots) when there are two columns.
const ASPECT = 16 / 9;
const GAP = 12;

function layoutGrid() {
  const grid = $('grid');
  const tiles = [...grid.children];
  if (!tiles.length) return;
  const screens = tiles.filter((t) => t.classList.contains('screen')).length;
  const slots = tiles.length + 3 * screens;
  const w = grid.clientWidth;
  const h = grid.clientHeight;
  if (!w || !h) return;
  let best = { cols: 1, width: 0 };
  for (let cols = 1; cols <= slots; cols += 1) {
    const rows = Math.ceil(slots / cols);
    const width = Math.min((w - GAP * (cols - 1)) / cols, ((h - GAP * (rows - 1)) / rows) * ASPECT);
    if (width > best.width) best = { cols, width };
  }
  const width = Math.max(120, Math.floor(best.width));
  grid.style.gridTemplateColumns = `repeat(${best.cols}, ${width}px)`;
  grid.style.gridAutoRows = `${Math.floor(width / ASPECT)}px`;
  grid.classList.toggle('one-col', best.cols < 2);
}

new ResizeObserver(layoutGrid).observe($('grid'));
new MutationObserver(layoutGrid).observe($('grid'), { childList: true });

initLobby();
