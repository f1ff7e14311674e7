#!/usr/bin/env node
// Media quality across a trunk, measured in real Chromium pages.
//
// Two clustered nodes must already run (this script starts none; see
// measure-trunk.sh): A and B. One page on A publishes camera + mic (fake
// devices); one page on A and one on B subscribe. The subscriber pages are
// receive-only: their getUserMedia is made to fail before the client loads,
// and the web client then joins without media (app.js openMedia() falls back
// to an empty stream). Each subscriber therefore receives exactly the
// publisher's audio and video; the video inbound-rtp is still matched to the
// publisher's camera track explicitly: roster track id (source "camera") ->
// window.__sb.remote (receiver MediaStreamTrack) -> inbound-rtp whose
// trackIdentifier is that track's id; the audio likewise via the roster
// track of source "microphone" (and, for getSynchronizationSources(), the
// RTCRtpReceiver whose track that is).
//
// In each subscriber page a sampler polls getStats() every 50 ms and keeps
// the publisher's video inbound-rtp counters; a requestVideoFrameCallback loop
// on the publisher's tile keeps (presentation time, receive time, RTP
// timestamp) per rendered frame. After both subscribers decode a first frame
// and a warm-up, a window of W seconds is measured.
//
// Delay. Two measures, both reported:
//  - jb_ms: jitterBufferDelay / jitterBufferEmittedCount over the 5 s ending
//    at the window's start and over the 5 s ending at its end. Robust and
//    always present; it is the receiver's buffering, which grows when the
//    network delivers frames late or unevenly (NACK round trips included),
//    but it does not see a standing queue in front of the receiver.
//  - e2e_growth_ms / net_growth_ms: relative one-way delay from rendered frames. A frame's
//    RTP timestamp (90 kHz) follows the publisher's capture clock, so
//    (presentation time - rtp/90) changes exactly as the capture-to-screen
//    delay changes, and (receive time - rtp/90) as the capture-to-arrival
//    delay does (queues in the proxy or node included). Medians over the same
//    two 5 s spans; "growth" = end - start. If the SFU keeps RTP timestamps
//    (it forwards them), A's and B's pages render frames with the same RTP
//    timestamps, and since both pages share one clock, B's presentation time
//    minus A's for the same frame is the delay the trunk adds (b_minus_a_ms).
//
// A/V sync (lip sync) of the publisher's microphone + camera, per subscriber
// and B - A (av_sync; the method and why it is not estimatedPlayoutTimestamp
// alone: see avSync()). The sampler also keeps, per tick, both tracks'
// estimatedPlayoutTimestamp (same getStats call) and both receivers'
// getSynchronizationSources() (RTP timestamp last delivered to the track, and
// when). B - A is measured without sender reports, by RTP timestamp on one
// clock, because estimatedPlayoutTimestamp lives in the frame of each node's
// own sender reports and so cannot see a wrong wallclock on B.
//
// Usage: node trunk-quality.mjs --a http://127.0.0.1:PORT --b http://127.0.0.1:PORT
//          [--window 30] [--warmup 5] [--label text] [--room name] [--out file.json]
//          [--dump raw.json]   (every page sample, for looking into a result)
// (or env SB_URL_A, SB_URL_B, TQ_WINDOW, TQ_WARMUP, TQ_LABEL, TQ_DUMP). Prints one JSON
// line (starts with "{") and one table row (starts with "|") on stdout.
import { writeFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { launchChromium, openPage } from './lib.mjs';

const STALL_MS = 200;
const SPAN_MS = 5000; // the "last 5 s" of the delay measures

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------- in-page code (serialized into the pages) ----------

/** Runs in a subscriber page: samples the publisher's streams until stopped. */
function pageSampler(pubId) {
  const tq = {
    pubId, clickAt: null, firstDecodeAt: null, firstFrameAt: null,
    video: [], audio: [], frames: [], av: [], ticks: 0, errors: [],
  };
  window.__tq = tq;
  const now = () => performance.timeOrigin + performance.now();
  const pubTrack = (source) => {
    const sb = window.__sb;
    const p = sb && sb.roster.find((x) => x.id === tq.pubId);
    const t = p && p.tracks.find((x) => x.source === source);
    return t ? sb.remote.get(t.id) : null;
  };
  const num = (v) => (typeof v === 'number' ? v : null);
  async function tick() {
    const sb = window.__sb;
    const vt = pubTrack('camera');
    if (sb && sb.pc && vt) {
      const at = pubTrack('microphone');
      const rep = await sb.pc.getStats();
      const t = now();
      // A/V sync (avSync()): what the receivers of the publisher's microphone
      // and camera tracks last delivered to their tracks, sampled right after
      // the getStats call whose estimatedPlayoutTimestamps go with it.
      const ar = at && sb.pc.getReceivers().find((r) => r.track === at);
      const ss = ar ? ar.getSynchronizationSources().reduce((x, y) => (x && x.timestamp >= y.timestamp ? x : y), null) : null;
      const vr = sb.pc.getReceivers().find((r) => r.track === vt);
      const vs = vr ? vr.getSynchronizationSources().reduce((x, y) => (x && x.timestamp >= y.timestamp ? x : y), null) : null;
      const av = {
        t: now(), ev: null, ea: null,
        ar: ss ? ss.rtpTimestamp : null, ats: ss ? ss.timestamp : null,
        vr: vs ? vs.rtpTimestamp : null, vts: vs ? vs.timestamp : null,
      };
      rep.forEach((s) => {
        if (s.type !== 'inbound-rtp') return;
        if (s.kind === 'video' && s.trackIdentifier === vt.id) {
          tq.video.push({
            t,
            fd: s.framesDecoded || 0,
            pr: s.packetsReceived || 0,
            lost: s.packetsLost || 0,
            nack: s.nackCount || 0,
            rtx: num(s.retransmittedPacketsReceived),
            jbd: s.jitterBufferDelay || 0,
            jbe: s.jitterBufferEmittedCount || 0,
            bytes: s.bytesReceived || 0,
            hdr: s.headerBytesReceived || 0,
            drop: s.framesDropped || 0,
            frz: num(s.freezeCount),
            frzDur: num(s.totalFreezesDuration),
            kf: s.keyFramesDecoded || 0,
            pli: s.pliCount || 0,
            fir: s.firCount || 0,
            w: s.frameWidth || 0,
            h: s.frameHeight || 0,
            fps: num(s.framesPerSecond),
          });
          if (tq.firstDecodeAt === null && s.framesDecoded > 0) tq.firstDecodeAt = t;
          av.ev = num(s.estimatedPlayoutTimestamp);
        } else if (s.kind === 'audio' && at && s.trackIdentifier === at.id) {
          av.ea = num(s.estimatedPlayoutTimestamp);
          if (tq.ticks % 10 !== 0) return;
          tq.audio.push({
            t,
            pr: s.packetsReceived || 0,
            lost: s.packetsLost || 0,
            bytes: s.bytesReceived || 0,
            hdr: s.headerBytesReceived || 0,
            conc: s.concealedSamples || 0,
            tot: s.totalSamplesReceived || 0,
            jbd: s.jitterBufferDelay || 0,
            jbe: s.jitterBufferEmittedCount || 0,
          });
        }
      });
      if (av.ar !== null || av.ev !== null || av.ea !== null) tq.av.push(av);
    }
    tq.ticks += 1;
  }
  (async () => {
    while (!tq.stopped) {
      const next = performance.now() + 50;
      try { await tick(); } catch (e) { if (tq.errors.length < 10) tq.errors.push(String(e)); }
      await new Promise((r) => setTimeout(r, Math.max(0, next - performance.now())));
    }
  })();
  // Rendered frames of the publisher's tile: rVFC metadata.
  let video = null;
  const onFrame = (_, m) => {
    if (tq.stopped) return;
    if (m.rtpTimestamp !== undefined) {
      const pres = performance.timeOrigin + m.presentationTime;
      tq.frames.push([pres, m.receiveTime !== undefined ? performance.timeOrigin + m.receiveTime : null, m.rtpTimestamp]);
      if (tq.firstFrameAt === null) tq.firstFrameAt = pres;
    }
    video.requestVideoFrameCallback(onFrame);
  };
  const attach = () => {
    if (tq.stopped) return;
    const v = document.querySelector(`.tile[data-participant-id="${CSS.escape(tq.pubId)}"]:not([data-screen]) video`);
    if (v && v !== video) {
      video = v;
      if (v.requestVideoFrameCallback) v.requestVideoFrameCallback(onFrame);
    }
    setTimeout(attach, 250);
  };
  attach();
}

// ---------- pages ----------

/** Publisher outbound video stats (to see what the sender did meanwhile). */
async function outboundVideo(page) {
  return page.evaluate(async () => {
    const pc = window.__sb.pc;
    let out = null;
    if (pc) {
      (await pc.getStats()).forEach((s) => {
        if (s.type === 'outbound-rtp' && s.kind === 'video' && (!out || (s.bytesSent || 0) > out.bytes)) {
          out = {
            t: performance.timeOrigin + performance.now(),
            fe: s.framesEncoded || 0, bytes: s.bytesSent || 0, hdr: s.headerBytesSent || 0,
            nack: s.nackCount || 0, pli: s.pliCount || 0, fir: s.firCount || 0,
            rtx: s.retransmittedPacketsSent ?? null, kf: s.keyFramesEncoded ?? null,
            w: s.frameWidth || 0, h: s.frameHeight || 0, fps: s.framesPerSecond ?? null,
            target: s.targetBitrate ?? null, qlr: s.qualityLimitationReason ?? null,
          };
        }
      });
    }
    return out;
  });
}

async function waitUntil(what, fn, timeoutMs, everyMs = 200) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last && last.ok) return last;
    await sleep(everyMs);
  }
  throw new Error(`${what}: not within ${timeoutMs} ms; last ${JSON.stringify(last)}`);
}

// ---------- metrics ----------

async function scrape(base) {
  try {
    const res = await fetch(`${base}/metrics`);
    return parseMetrics(await res.text());
  } catch (e) {
    return { error: String(e), types: {}, values: {} };
  }
}

/** switchboard_trunk_* and switchboard_remote_* series of an OpenMetrics text. */
export function parseMetrics(text) {
  const types = {};
  const values = {};
  for (const line of text.split('\n')) {
    const ty = line.match(/^# TYPE (\S+) (\S+)/);
    if (ty) { types[ty[1]] = ty[2]; continue; }
    if (!/^switchboard_(trunk|remote)_/.test(line)) continue;
    const m = line.match(/^(\S+?)(\{[^}]*\})?\s+(\S+)/);
    if (m) values[m[1] + (m[2] || '')] = Number(m[3]);
  }
  return { types, values };
}

/** Per series: counters -> after - before; gauges (and unknown) -> [before, after]. */
export function metricsDelta(before, after) {
  const out = {};
  const names = new Set([...Object.keys(before.values), ...Object.keys(after.values)]);
  for (const series of [...names].sort()) {
    const name = series.replace(/\{.*$/, '');
    const family = name.replace(/_(total|created)$/, '');
    const type = after.types[name] || after.types[family] || before.types[family];
    const b = before.values[series];
    const a = after.values[series];
    if (type === 'counter') out[series] = (a ?? 0) - (b ?? 0);
    else out[series] = [b ?? null, a ?? null];
  }
  return out;
}

// ---------- analysis ----------

/** The last sample at or before t (or the first one if none). */
function at(samples, t) {
  let best = samples[0];
  for (const s of samples) { if (s.t <= t) best = s; else break; }
  return best;
}

function median(xs) {
  if (!xs.length) return null;
  const a = [...xs].sort((x, y) => x - y);
  return a[Math.floor(a.length / 2)];
}

const r1 = (x) => (x === null || x === undefined || Number.isNaN(x) ? null : Math.round(x * 10) / 10);
const d = (a, b, k) => (a[k] === null || b[k] === null ? null : b[k] - a[k]);

function jbMs(samples, t) {
  const a = at(samples, t - SPAN_MS);
  const b = at(samples, t);
  const n = b.jbe - a.jbe;
  return n > 0 ? r1(((b.jbd - a.jbd) / n) * 1000) : null;
}

function unwrapRtp(frames) {
  // 32-bit RTP timestamps may wrap during a run; frames arrive in order.
  let offset = 0;
  let prev = null;
  return frames.map(([pres, recv, ts]) => {
    if (prev !== null && ts - prev < -(2 ** 31)) offset += 2 ** 32;
    if (prev !== null && ts - prev > 2 ** 31) offset -= 2 ** 32;
    prev = ts;
    return { pres, recv, ts, ms: (ts + offset) / 90 };
  });
}

function relDelay(frames, t0, t1, field) {
  const xs = frames.filter((f) => f.pres > t0 && f.pres <= t1 && f[field] !== null).map((f) => f[field] - f.ms);
  return median(xs);
}

function analyse(tq, T0, T1) {
  const v = tq.video;
  if (!v.length) return { error: 'no samples' };
  const a = at(v, T0);
  const b = at(v, T1);
  const win = v.filter((s) => s.t > T0 && s.t <= T1);
  // Stalls: gaps >= 200 ms between increases of framesDecoded (the window's
  // edges count as boundaries, so a stall across an edge counts in part).
  let prevT = T0;
  let prevFd = a.fd;
  let stalledMs = 0;
  let stalls = 0;
  let longest = 0;
  for (const s of win) {
    if (s.fd > prevFd) {
      const gap = s.t - prevT;
      if (gap >= STALL_MS) { stalledMs += gap; stalls += 1; longest = Math.max(longest, gap); }
      prevT = s.t;
      prevFd = s.fd;
    }
  }
  if (T1 - prevT >= STALL_MS) { stalledMs += T1 - prevT; stalls += 1; longest = Math.max(longest, T1 - prevT); }
  // Sampling quality: a late tick looks like a stall.
  let maxTick = 0;
  for (let i = 1; i < win.length; i++) maxTick = Math.max(maxTick, win[i].t - win[i - 1].t);
  const secs = (b.t - a.t) / 1000;
  const frames = unwrapRtp(tq.frames);
  const e2e0 = relDelay(frames, T0 - SPAN_MS, T0, 'pres');
  const e2e1 = relDelay(frames, T1 - SPAN_MS, T1, 'pres');
  const net0 = relDelay(frames, T0 - SPAN_MS, T0, 'recv');
  const net1 = relDelay(frames, T1 - SPAN_MS, T1, 'recv');
  const au = tq.audio;
  let audio = null;
  if (au.length) {
    const x = at(au, T0);
    const y = at(au, T1);
    audio = {
      packets: y.pr - x.pr, lost: y.lost - x.lost,
      kbps: r1(((y.bytes + y.hdr - x.bytes - x.hdr) * 8) / ((y.t - x.t) || 1)),
      concealed_pct: y.tot > x.tot ? r1((100 * (y.conc - x.conc)) / (y.tot - x.tot)) : null,
      jb_ms: y.jbe > x.jbe ? r1(((y.jbd - x.jbd) / (y.jbe - x.jbe)) * 1000) : null, // whole window
    };
  }
  return {
    frames: b.fd - a.fd,
    fps: r1((b.fd - a.fd) / secs),
    fps_stat: b.fps,
    stalled_s: r1(stalledMs / 1000),
    stalls,
    longest_stall_ms: Math.round(longest),
    packets: b.pr - a.pr,
    lost: b.lost - a.lost,
    nacks: b.nack - a.nack,
    rtx: d(a, b, 'rtx'),
    dropped: b.drop - a.drop,
    freezes: d(a, b, 'frz'),
    freeze_s: a.frzDur === null || b.frzDur === null ? null : r1(b.frzDur - a.frzDur),
    keyframes: b.kf - a.kf,
    plis: b.pli - a.pli,
    firs: b.fir - a.fir,
    kbps: r1(((b.bytes + b.hdr - a.bytes - a.hdr) * 8) / (b.t - a.t)),
    resolution: `${b.w}x${b.h}`,
    jb_ms: [jbMs(v, T0), jbMs(v, T1)],
    e2e_growth_ms: e2e0 === null || e2e1 === null ? null : r1(e2e1 - e2e0),
    net_growth_ms: net0 === null || net1 === null ? null : r1(net1 - net0),
    first_frame_ms: tq.firstDecodeAt === null ? null : Math.round(tq.firstDecodeAt - tq.clickAt),
    first_render_ms: tq.firstFrameAt === null ? null : Math.round(tq.firstFrameAt - tq.clickAt),
    audio,
    sampling: { polls: win.length, max_gap_ms: Math.round(maxTick), rendered_frames: frames.filter((f) => f.pres > T0 && f.pres <= T1).length },
    errors: tq.errors,
  };
}

/**
 * Delay B adds over A for the same frames (matched by RTP timestamp): B's
 * frames rendered in (t0, t1] against A's rendering of the same frame,
 * whenever that was.
 */
function bMinusA(ta, tb, t0, t1) {
  const fa = new Map(ta.frames.map((f) => [f[2], f]));
  const pres = [];
  const recv = [];
  for (const f of tb.frames) {
    if (!(f[0] > t0 && f[0] <= t1)) continue;
    const g = fa.get(f[2]);
    if (!g) continue;
    pres.push(f[0] - g[0]);
    if (f[1] !== null && g[1] !== null) recv.push(f[1] - g[1]);
  }
  return { matched: pres.length, pres_ms: r1(median(pres)), recv_ms: r1(median(recv)) };
}

/** Signed difference a - b of two 32-bit RTP timestamps, in ticks. */
function rtpDiff(a, b) {
  return ((((a - b) % 2 ** 32) + 2 ** 32 + 2 ** 31) % 2 ** 32) - 2 ** 31;
}

function quantile(xs, q) {
  if (!xs.length) return null;
  const a = [...xs].sort((x, y) => x - y);
  return a[Math.min(a.length - 1, Math.floor(q * a.length))];
}

/** median signed, median |x| and p90 |x| of samples (null if none). */
function spread(xs) {
  if (!xs.length) return { n: 0, median_ms: null, median_abs_ms: null, p90_abs_ms: null };
  const abs = xs.map(Math.abs);
  return { n: xs.length, median_ms: r1(median(xs)), median_abs_ms: r1(median(abs)), p90_abs_ms: r1(quantile(abs, 0.9)) };
}

/**
 * A/V sync samples of one subscriber page in (t0, t1], one per getStats
 * tick. Per stream, the RTP time (ms from the anchors, i.e. on the
 * publisher's own RTP clocks: the SFU forwards RTP timestamps) of the media
 * the page outputs, carried forward to the tick: rtp/clock + (t - when it was
 * output). Per tick, video minus audio of that (t cancels):
 *   track:   both from RTCRtpReceiver.getSynchronizationSources(), whose
 *            timestamp is when media with that RTP timestamp was delivered to
 *            the MediaStreamTrack: audio played out, a video frame decoded
 *            and handed to the renderer on WebRTC's schedule (jitter buffer
 *            and A/V sync delays included);
 *   display: the same with the video frame on screen (rVFC presentationTime)
 *            instead: adds the compositor, which in headless Chromium now and
 *            then shifts every frame by a whole frame interval (50 ms at
 *            20 fps), on either page, with or without a trunk;
 *   est:     video.estimatedPlayoutTimestamp - audio.estimatedPlayoutTimestamp
 *            (one getStats call).
 * track and display differ from the offset a viewer perceives by one constant
 * (the publisher's audio-vs-video RTP origin), the same on every page. A tick
 * at which audio or video was not output for STALL_MS counts as frozen (no
 * lip sync to speak of).
 */
function avSamples(tq, t0, t1, anchors) {
  const frames = tq.frames;
  const out = [];
  let i = 0;
  let frozen = 0;
  for (const s of tq.av) {
    if (!(s.t > t0 && s.t <= t1)) continue;
    while (i + 1 < frames.length && frames[i + 1][0] <= s.t) i += 1;
    const f = frames[i] && frames[i][0] <= s.t ? frames[i] : null;
    const fresh = (at) => at !== null && s.t - at <= STALL_MS;
    const audio = fresh(s.ats) ? rtpDiff(s.ar, anchors.a) / 48 - s.ats : null;
    const video = fresh(s.vts) ? rtpDiff(s.vr, anchors.v) / 90 - s.vts : null;
    const shown = f && fresh(f[0]) ? rtpDiff(f[2], anchors.v) / 90 - f[0] : null;
    if (audio === null || video === null) frozen += 1;
    out.push({
      track: audio === null || video === null ? null : video - audio,
      display: audio === null || shown === null ? null : shown - audio,
      est: s.ev !== null && s.ea !== null ? s.ev - s.ea : null,
    });
  }
  return { samples: out, frozen };
}

/**
 * Lip sync of the publisher's microphone + camera at A, at B, and B - A.
 * Offsets in ms, video minus audio: + = video ahead of the audio (audio
 * late), - = video behind the audio.
 *
 * Method, and why. estimatedPlayoutTimestamp (the first choice) is present
 * in this Chromium, but only once a page holds two sender reports of each
 * stream (the nodes send audio SRs every ~5 s: ~10 s after joining), and it
 * cannot be trusted to see the fault we look for: it is the SR-NTP time of
 * what plays, so video.est - audio.est is Chrome's own A/V sync residual *in
 * the frame of that node's sender reports*, and differs from the offset the
 * page really outputs by the error of those reports (plus Chrome's guess of
 * when a frame renders). If B's reports
 * put video 100 ms late against audio, Chrome on B delays video to match and
 * est misses those 100 ms. (With the build from before the trunk carried
 * origin times, at 40±10 ms, est B - A was 49..96 ms where the number below
 * gave 51..124: most of that offset was Chrome's sync not keeping up with a
 * growing trunk delay, which est does see. It also ignores the compositor.)
 * So the deciding number uses no sender report: both pages receive the same
 * RTP timestamps, so the track offset (avSamples) of B minus that of A is the
 * change in perceived lip sync, on one clock:
 *     b_minus_a_ms = median(track at B) - median(track at A)
 *                  = audio delay B adds - video delay B adds (both reported).
 * The display offset is reported too (display_b_minus_a_ms), but it carries
 * the compositor's whole-frame steps (up to ±50 ms per page, unrelated to the
 * network), so the assertion uses the track offset.
 * Absolute offsets (median, median |x|, p90 |x| per page) need the constant
 * the track offset is off by; it is taken from A: K = median over A's ticks
 * of (track - est), offset = track - K. They are thus in the frame of A's
 * sender reports, i.e. of when the origin node received each stream from the
 * publisher (the time the trunk now carries), and at A they are about A's
 * est offset. Each page's own est offsets are reported as "est".
 */
export function avSync(tqA, tqB, T0, T1) {
  const a0 = tqA.av.find((s) => s.ar !== null && s.vr !== null);
  if (!a0) return { error: 'the subscriber on A output no audio or no video' };
  const anchors = { v: a0.vr, a: a0.ar };
  const A = avSamples(tqA, T0, T1, anchors);
  const B = avSamples(tqB, T0, T1, anchors);
  const vals = (x, k) => x.samples.map((s) => s[k]).filter((v) => v !== null);
  const calib = (k) => median(A.samples.filter((s) => s[k] !== null && s.est !== null).map((s) => s[k] - s.est));
  const K = { track: calib('track'), display: calib('display') };
  const abs = (x, k) => (K[k] === null ? spread([]) : spread(vals(x, k).map((o) => o - K[k])));
  const side = (x) => ({
    ...abs(x, 'track'),
    display: abs(x, 'display'),
    est: spread(vals(x, 'est')),
    ticks: x.samples.length,
    frozen: x.frozen,
  });
  const diff = (k) => {
    const a = median(vals(A, k));
    const b = median(vals(B, k));
    return a === null || b === null ? null : b - a;
  };
  // Delay B adds per stream: when B outputs an RTP time minus when A does.
  const out = (tq, ts, rtp, clock, anchor) => median(tq.av
    .filter((s) => s.t > T0 && s.t <= T1 && s[ts] !== null && s[rtp] !== null)
    .map((s) => s[ts] - rtpDiff(s[rtp], anchor) / clock));
  const delay = (ts, rtp, clock, anchor) => {
    const a = out(tqA, ts, rtp, clock, anchor);
    const b = out(tqB, ts, rtp, clock, anchor);
    return a === null || b === null ? null : b - a;
  };
  const audioDelay = delay('ats', 'ar', 48, anchors.a);
  const videoDelay = delay('vts', 'vr', 90, anchors.v);
  // Seconds apart would mean the pages do not see the same RTP timestamps.
  const same = audioDelay !== null && videoDelay !== null && Math.abs(audioDelay) < 5000 && Math.abs(videoDelay) < 5000;
  // How far B's sender reports put its audio against its video compared
  // with A's: per page, track - est is the error of that node's reports
  // (est is Chrome's residual in the frame of those reports), so B's
  // median of it minus A's is the error B's reports add. The SFU controls
  // exactly this (the wallclock it gives str0m for each packet); Chrome's
  // sync dead band (below) does not enter it.
  const srErr = (x) => median(x.samples.filter((s) => s.track !== null && s.est !== null).map((s) => s.track - s.est));
  const srA = srErr(A);
  const srB = srErr(B);
  return {
    A: side(A),
    B: side(B),
    sr_error_b_minus_a_ms: same && srA !== null && srB !== null ? r1(srB - srA) : null,
    b_minus_a_ms: same ? r1(diff('track')) : null,
    display_b_minus_a_ms: same ? r1(diff('display')) : null,
    est_b_minus_a_ms: r1(diff('est')),
    audio_delay_b_minus_a_ms: r1(audioDelay),
    video_delay_b_minus_a_ms: r1(videoDelay),
    same_rtp_timestamps: same,
  };
}

// ---------- the measurement ----------

/**
 * Publisher + subscriber on node A, subscriber on node B; returns the result
 * object. opts: { a, b, windowS, warmupS, label, room, firstFrameTimeoutMs, log, dump }
 */
export async function measureTrunkQuality(opts) {
  const { a, b } = opts;
  const windowS = opts.windowS ?? 30;
  const warmupS = opts.warmupS ?? 5;
  const label = opts.label ?? '';
  const room = opts.room ?? `trunk-quality-${process.pid}-${Date.now() % 100000}`;
  const log = opts.log ?? ((m) => console.error(m));
  const browser = opts.browser ?? await launchChromium();
  try {
    const pub = await openPage(browser, a, room, 'Publisher on A', { receiveOnly: false });
    await pub.click('#join-btn');
    await pub.waitForFunction(() => window.__sb && window.__sb.me, null, { timeout: 15_000 });
    const pubId = await pub.evaluate(() => window.__sb.me);
    await waitUntil('publisher sends video', async () => {
      const o = await outboundVideo(pub);
      return { ok: !!o && o.fe > 0, o };
    }, 20_000);
    log(`publisher ${pubId} sending; joining subscribers on A and B`);

    const subA = await openPage(browser, a, room, 'Subscriber on A', { receiveOnly: true });
    const subB = await openPage(browser, b, room, 'Subscriber on B', { receiveOnly: true });
    const click = async (page) => {
      await page.evaluate(pageSampler, pubId);
      await page.evaluate(() => {
        window.__tq.clickAt = performance.timeOrigin + performance.now();
        document.getElementById('join-btn').click();
      });
    };
    await Promise.all([click(subA), click(subB)]);

    const timeout = opts.firstFrameTimeoutMs ?? 60_000;
    await waitUntil('both subscribers decode the publisher\'s video', async () => {
      const fa = await subA.evaluate(() => window.__tq.firstDecodeAt);
      const fb = await subB.evaluate(() => window.__tq.firstDecodeAt);
      return { ok: fa !== null && fb !== null, fa, fb };
    }, timeout);
    log(`both subscribers decode; warm-up ${warmupS} s, window ${windowS} s`);
    await sleep(warmupS * 1000);

    const mBefore = { A: await scrape(a), B: await scrape(b) };
    const oBefore = await outboundVideo(pub);
    const T0 = Date.now();
    await sleep(windowS * 1000);
    const T1 = Date.now();
    const mAfter = { A: await scrape(a), B: await scrape(b) };
    const oAfter = await outboundVideo(pub);

    const grab = (p) => p.evaluate(() => { window.__tq.stopped = true; return window.__tq; });
    const [tqA, tqB] = [await grab(subA), await grab(subB)];
    if (opts.dump) writeFileSync(opts.dump, `${JSON.stringify({ T0, T1, A: tqA, B: tqB })}\n`);
    const resA = analyse(tqA, T0, T1);
    const resB = analyse(tqB, T0, T1);
    const o = oBefore && oAfter ? {
      frames: oAfter.fe - oBefore.fe,
      kbps: r1(((oAfter.bytes + oAfter.hdr - oBefore.bytes - oBefore.hdr) * 8) / (oAfter.t - oBefore.t)),
      nacks_in: oAfter.nack - oBefore.nack,
      plis_in: oAfter.pli - oBefore.pli,
      firs_in: oAfter.fir - oBefore.fir,
      rtx_sent: oAfter.rtx === null || oBefore.rtx === null ? null : oAfter.rtx - oBefore.rtx,
      keyframes: oAfter.kf === null || oBefore.kf === null ? null : oAfter.kf - oBefore.kf,
      resolution: `${oAfter.w}x${oAfter.h}`,
      fps: oAfter.fps,
      target_kbps: oAfter.target === null ? null : r1(oAfter.target / 1000),
      quality_limitation: oAfter.qlr,
    } : null;
    return {
      label,
      window_s: windowS,
      warmup_s: warmupS,
      room,
      t0: new Date(T0).toISOString(),
      B: resB,
      A: resA,
      b_minus_a: {
        start: bMinusA(tqA, tqB, T0 - SPAN_MS, T0),
        end: bMinusA(tqA, tqB, T1 - SPAN_MS, T1),
        video: bMinusA(tqA, tqB, T0, T1),
      },
      av_sync: avSync(tqA, tqB, T0, T1),
      publisher: o,
      metrics: { A: metricsDelta(mBefore.A, mAfter.A), B: metricsDelta(mBefore.B, mAfter.B) },
    };
  } finally {
    if (!opts.browser) await browser.close();
  }
}

export const TABLE_HEADER = [
  '| impairment | B frames | B stalled s | B lost | B nacks | B jb ms start→end | B e2e growth ms | B−A ms start→end | B first frame ms | A frames | A stalled s | A first frame ms | A/V offset A → B ms |',
  '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
].join('\n');

/** "A → B (Δ B−A)" of the median signed A/V offsets (+: video ahead). */
function avCell(av) {
  if (!av || av.error) return '–';
  const f = (x) => (x === null || x === undefined ? '–' : `${x > 0 ? '+' : ''}${x}`);
  return `${f(av.A.median_ms)} → ${f(av.B.median_ms)} (Δ ${f(av.b_minus_a_ms)})`;
}

export function tableRow(r) {
  const arrow = (p) => (p ? `${p[0] ?? '–'} → ${p[1] ?? '–'}` : '–');
  const B = r.B;
  const A = r.A;
  return `| ${r.label} | ${B.frames} | ${B.stalled_s} | ${B.lost} | ${B.nacks} | ${arrow(B.jb_ms)} | ${B.e2e_growth_ms ?? '–'} | `
    + `${arrow([r.b_minus_a.start.pres_ms, r.b_minus_a.end.pres_ms])} | ${B.first_frame_ms} | ${A.frames} | ${A.stalled_s} | ${A.first_frame_ms} | `
    + `${avCell(r.av_sync)} |`;
}

// ---------- command line ----------

function parseArgs(argv) {
  const o = {
    a: process.env.SB_URL_A,
    b: process.env.SB_URL_B,
    windowS: Number(process.env.TQ_WINDOW || 30),
    warmupS: Number(process.env.TQ_WARMUP || 5),
    label: process.env.TQ_LABEL || '',
    room: process.env.TQ_ROOM,
    out: process.env.TQ_OUT,
    dump: process.env.TQ_DUMP,
    header: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = () => argv[++i];
    if (k === '--a') o.a = v();
    else if (k === '--b') o.b = v();
    else if (k === '--window') o.windowS = Number(v());
    else if (k === '--warmup') o.warmupS = Number(v());
    else if (k === '--label') o.label = v();
    else if (k === '--room') o.room = v();
    else if (k === '--out') o.out = v();
    else if (k === '--dump') o.dump = v();
    else if (k === '--header') o.header = true;
    else throw new Error(`unknown argument ${k}`);
  }
  if (!o.a || !o.b) throw new Error('need --a and --b (or SB_URL_A, SB_URL_B): the URLs of two clustered nodes');
  o.a = o.a.replace(/\/$/, '');
  o.b = o.b.replace(/\/$/, '');
  return o;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const o = parseArgs(process.argv.slice(2));
  const r = await measureTrunkQuality(o);
  const line = JSON.stringify(r);
  if (o.out) writeFileSync(o.out, `${line}\n`);
  console.log(line);
  if (o.header) console.log(TABLE_HEADER);
  console.log(tableRow(r));
}
