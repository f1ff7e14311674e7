// Switchboard web client: plain ES module, no build step.
// Speaks docs/SIGNALING.md over /ws. One RTCPeerConnection per session;
// perfect negotiation with this side polite (the server is impolite).

const $ = (id) => document.getElementById(id);
const ROOM_RE = /^[A-Za-z0-9._-]{1,64}$/;

// Phones and other small screens (also held sideways): the call shows video
// first, chat is an overlay that starts closed. Same query as style.css.
const NARROW = matchMedia('(max-width: 600px), (max-height: 500px)');

// An invitation link carries a join token (`/r/<room>?token=<jwt>`). It is
// sent with `join`; the server checks it and decides from it the room, the
// display name and what this participant may do (publish, subscribe, chat).
const TOKEN = (new URLSearchParams(location.search).get('token') || '').trim() || null;

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
  fatal: false,
  canPublish: true,    // false once the server refused publishing (token without the right)
  canChat: true,       // false once the server refused chat
  lastAsk: { publish: 0, chat: 0 }, // when we last asked to publish / chat (to tell what a `forbidden` refers to)
};
window.__sb = state; // for tests and debugging

// ---------- lobby ----------

function roomFromPath() {
  const m = location.pathname.match(/^\/r\/([^/]+)$/);
  return m ? decodeURIComponent(m[1]) : '';
}

// The token's claims, decoded WITHOUT checking the signature (only the
// server can): used only to prefill the lobby and to explain a refusal.
function tokenClaims() {
  if (!TOKEN) return {};
  try {
    let b64 = TOKEN.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const c = JSON.parse(new TextDecoder().decode(bytes));
    return c && typeof c === 'object' ? c : {};
  } catch {
    return {};
  }
}

function claim(key) {
  const v = tokenClaims()[key];
  return typeof v === 'string' ? v.trim() : '';
}

// What the token grants when it says (`grants: {publish, subscribe, chat}`;
// a grant it leaves out is not given), else null. Spares a request the
// server would refuse; the server enforces either way.
function tokenGrants() {
  const g = tokenClaims().grants;
  return g && typeof g === 'object' ? { publish: g.publish === true, chat: g.chat === true } : null;
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
  const tokenRoom = ROOM_RE.test(claim('room')) ? claim('room') : '';
  $('room').value = room || tokenRoom || localStorage.getItem('sb.room') || '';
  $('name').value = claim('name') || localStorage.getItem('sb.name') || '';
  $('invite-note').hidden = !TOKEN;
  const grants = tokenGrants();
  if (grants && !grants.chat) disableChat();
  if (grants && !grants.publish) receiveOnly();
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
    // Keep the query: the token must survive a reload of the call page.
    if (roomFromPath() !== r) history.pushState({}, '', `/r/${encodeURIComponent(r)}${location.search}`);
    state.room = r;
    state.name = n;
    $('join-btn').disabled = true;
    previewing.finally(() => {
      $('join-btn').disabled = false;
      enterCall();
    });
  };
  if (state.canPublish) startPreview(); // no camera to open for a watch-only link
}

function showJoinError(msg) { $('join-error').textContent = msg; }

// ---------- session ----------

function showRoom() {
  $('room-label').textContent = `Room ${state.room}`;
  document.title = `${state.room} · Switchboard`;
}

function enterCall() {
  $('lobby').hidden = true;
  $('left').hidden = true;
  $('call').hidden = false;
  $('controls').hidden = false;
  showRoom();
  if (NARROW.matches) setChatOpen(false); // video first on a phone
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
  ws.onopen = () => {
    // Room and name as typed even with a token: when the token names them,
    // the server uses the token's (and says so in `joined`).
    const join = { type: 'join', room: state.room, name: state.name };
    if (TOKEN) join.token = TOKEN;
    send(join);
  };
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
  token_required: 'This room needs an invitation link. Ask whoever runs the call for one.',
  token_invalid: 'This link is not valid. Check that you copied all of it, or ask for a new one.',
  token_expired: 'This link has expired — ask for a new one.',
  token_wrong_room: 'This link is not valid for this room.',
  forbidden: 'Your link does not allow that.',
  forbidden_publish: 'Your link lets you watch and listen, but not send your camera, microphone or screen.',
  forbidden_chat: 'Your link does not allow chat in this room.',
};

// Refusals of the join itself: retrying cannot help, so no reconnect and no
// "Rejoin" button (the link has to change).
const TOKEN_ERRORS = new Set(['token_required', 'token_invalid', 'token_expired', 'token_wrong_room']);

async function onMessage(msg) {
  switch (msg.type) {
    case 'joined':
      state.me = msg.participant_id;
      state.retries = 0;
      adoptJoined(msg);
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

// The server may have set room and name from the token: show its choice.
function adoptJoined(msg) {
  if (typeof msg.name === 'string' && msg.name) state.name = msg.name;
  if (typeof msg.room === 'string' && msg.room && msg.room !== state.room) {
    state.room = msg.room;
    history.replaceState({}, '', `/r/${encodeURIComponent(msg.room)}${location.search}`);
    showRoom();
  }
}

function onError(msg) {
  state.errors.push(msg);
  console.warn('server error', msg.code, msg.message);
  const text = ERROR_TEXT[msg.code] || msg.message;
  if (msg.code === 'forbidden') {
    onForbidden(msg);
  } else if (TOKEN_ERRORS.has(msg.code)) {
    state.fatal = true;
    let detail = text;
    let link = null;
    const other = claim('room');
    if (msg.code === 'token_wrong_room' && ROOM_RE.test(other) && other !== state.room) {
      detail = `${text} It is for the room “${other}”.`;
      link = { href: `/r/${encodeURIComponent(other)}${location.search}`, text: `Go to room ${other}` };
    }
    leaveUi('Could not join', detail, { rejoin: false, link });
  } else if (msg.code === 'full' || msg.code === 'invalid_room' || msg.code === 'invalid_name') {
    state.fatal = true;
    leaveUi('Could not join', text);
  } else {
    banner(text, true);
  }
}

// No camera, microphone or screen from this page: the controls that send
// are disabled and the camera (if open) is released.
function receiveOnly() {
  state.canPublish = false;
  for (const id of ['mic-btn', 'cam-btn', 'screen-btn']) {
    $(id).disabled = true;
    $(id).title = 'Your link does not allow sending';
  }
  if (state.local) state.local.getTracks().forEach((t) => t.stop());
  state.local = new MediaStream();
  $('preview').srcObject = null;
  $('preview-empty').hidden = false;
  $('preview-empty').textContent = 'Your link lets you watch and listen only';
  $('cam-select').closest('.row').hidden = true;
}

function disableChat() {
  state.canChat = false;
  $('chat-input').disabled = true;
  $('chat-input').placeholder = 'Your link does not allow chat';
  $('chat-form').querySelector('button').disabled = true;
}

// `forbidden` names no action: it answers our latest request that needs a
// right. An offer of ours still waiting with tracks in it is a publish;
// otherwise the more recent of publish (offer, mute) and chat, if recent.
function onForbidden(msg) {
  const pc = state.pc;
  const now = performance.now();
  const recent = (t) => t > 0 && now - t < 10000;
  let what = 'other';
  if (pc && pc.signalingState === 'have-local-offer' && sdpSendsMedia(pc.localDescription && pc.localDescription.sdp)) what = 'publish';
  else if (recent(state.lastAsk.chat) && state.lastAsk.chat >= state.lastAsk.publish) what = 'chat';
  else if (recent(state.lastAsk.publish)) what = 'publish';
  if (what === 'publish') {
    if (stopPublishing()) banner(ERROR_TEXT.forbidden_publish, true); // said once
  } else if (what === 'chat') {
    disableChat();
    banner(ERROR_TEXT.forbidden_chat, true);
  } else {
    banner(ERROR_TEXT.forbidden || msg.message, true);
  }
}

// The token does not allow publishing: become receive-only for good (this
// page), so nothing offers our tracks again — not this connection, not a
// reconnect. The sending transceivers go inactive; if the refused offer is
// still pending (the server ignores it: no answer will come) a new offer
// replaces it. Not a rollback: after rolling back its first offer Chromium
// forgets the data channel, and an offer without any m-line fails.
// True the first time.
function stopPublishing() {
  const first = state.canPublish;
  if (first) {
    stopScreen();
    receiveOnly();
  }
  const pc = state.pc;
  if (pc) {
    for (const tx of pc.getTransceivers()) {
      if (tx.sb_source && !tx.stopped && tx.direction !== 'inactive') {
        tx.direction = 'inactive';
        tx.sender.replaceTrack(null).catch(() => { /* pc closed */ });
      }
    }
    if (pc.signalingState === 'have-local-offer' && !state.makingOffer
        && sdpSendsMedia(pc.localDescription && pc.localDescription.sdp)) {
      reoffer(pc).catch((e) => console.warn('offer without media', e));
    }
  }
  render();
  return first;
}

// A new offer in place of our pending one (setLocalDescription from have-local-offer).
async function reoffer(pc) {
  state.makingOffer = true;
  try {
    await pc.setLocalDescription();
    if (pc !== state.pc || pc.signalingState !== 'have-local-offer') return;
    send({ type: 'offer', sdp: pc.localDescription.sdp, tracks: trackList(pc) });
  } finally {
    state.makingOffer = false;
  }
}

// Does this SDP send audio or video (an m-line not rejected whose direction
// is sendrecv or sendonly)? The server's test for needing the publish right.
function sdpSendsMedia(sdp) {
  let sends = false;
  let media = false;
  let live = false;
  let dir = null;
  const flush = () => { if (media && live && (!dir || dir === 'sendrecv' || dir === 'sendonly')) sends = true; };
  for (const line of (sdp || '').split(/\r?\n/)) {
    if (line.startsWith('m=')) {
      flush();
      const [kind, port] = line.slice(2).split(' ');
      media = kind === 'audio' || kind === 'video';
      live = port !== '0';
      dir = null;
    } else if (line === 'a=bundle-only') {
      live = true;
    } else if (/^a=(sendrecv|sendonly|recvonly|inactive)$/.test(line)) {
      dir = line.slice(2);
    }
  }
  flush();
  return sends;
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
  for (const t of state.canPublish && state.local ? state.local.getTracks() : []) {
    const tx = pc.addTransceiver(t, { direction: 'sendonly', streams: [state.local] });
    tx.sb_source = t.kind === 'audio' ? 'microphone' : 'camera';
  }
  if (state.screen && state.canPublish) addScreenTransceiver();
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
  // One offer at a time, from stable (browsers fire negotiationneeded again
  // once a negotiation ends if more is needed).
  if (!pc || !state.me || pc.signalingState !== 'stable' || state.makingOffer) return;
  state.makingOffer = true;
  try {
    await pc.setLocalDescription();
    if (pc !== state.pc || pc.signalingState !== 'have-local-offer') return;
    const tracks = trackList(pc);
    if (tracks.length) state.lastAsk.publish = performance.now();
    send({ type: 'offer', sdp: pc.localDescription.sdp, tracks });
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
  if (state.canPublish) {
    state.lastAsk.publish = performance.now();
    send({ type: 'mute', audio: state.micMuted, video: state.camOff });
  }
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
  if (!state.canPublish) return banner(ERROR_TEXT.forbidden_publish, true);
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

function leaveUi(title, text, { rejoin = true, link = null } = {}) {
  state.phase = 'left';
  clearTimeout(state.retryTimer);
  $('rejoin').hidden = !rejoin;
  $('left-link').href = link ? link.href : '/';
  $('left-link').textContent = link ? link.text : 'Pick another room';
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
  const log = $('chat-log');
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(li);
  if (atEnd || msg.from === state.me) log.scrollTop = log.scrollHeight;
  if ($('chat').classList.contains('closed') && msg.from !== state.me) {
    state.chatUnread++;
    showUnread();
  }
}

function showUnread() {
  const n = state.chatUnread;
  $('chat-badge').hidden = n === 0;
  $('chat-badge').textContent = n > 99 ? '99+' : String(n);
  $('chat-btn').setAttribute('aria-label', n ? `Chat, ${n} unread` : 'Chat');
}

// On a phone the chat is an overlay over the video; on a desktop a column.
function setChatOpen(open) {
  $('chat').classList.toggle('closed', !open);
  $('chat-btn').setAttribute('aria-expanded', String(open));
  if (open) {
    state.chatUnread = 0;
    showUnread();
    $('chat-log').scrollTop = $('chat-log').scrollHeight;
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
$('chat-btn').onclick = () => setChatOpen($('chat').classList.contains('closed'));
$('chat-close').onclick = () => setChatOpen(false);
document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && NARROW.matches && !$('chat').classList.contains('closed')) setChatOpen(false);
});
// Turning a tablet or resizing a window across the breakpoint: video first
// when narrow, the chat column back when wide.
NARROW.addEventListener('change', (e) => setChatOpen(!e.matches));
// Mobile browsers have no screen capture: no button that can only fail.
$('screen-btn').hidden = !(navigator.mediaDevices && navigator.mediaDevices.getDisplayMedia);
$('chat-form').onsubmit = (e) => {
  e.preventDefault();
  const text = $('chat-input').value.trim();
  if (!text || !state.canChat) return;
  state.lastAsk.chat = performance.now();
  send({ type: 'chat', text });
  $('chat-input').value = '';
};
$('rejoin').onclick = () => {
  state.fatal = false;
  state.phase = 'lobby';
  if (!state.room) { location.href = '/'; return; }
  (state.canPublish ? startPreview() : Promise.resolve()).then(enterCall);
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
  const gap = parseFloat(getComputedStyle(grid).columnGap) || GAP; // smaller on phones
  let best = { cols: 1, width: 0 };
  for (let cols = 1; cols <= slots; cols += 1) {
    const rows = Math.ceil(slots / cols);
    const width = Math.min((w - gap * (cols - 1)) / cols, ((h - gap * (rows - 1)) / rows) * ASPECT);
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
