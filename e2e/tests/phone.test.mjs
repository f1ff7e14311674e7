// A phone (Chromium, 390×844, isMobile, touch) in a call of three: the call
// shows video first. Every remote tile is inside the viewport, not covered
// (elementFromPoint), and decoding; chat is closed by default and a message
// from someone else shows an unread badge; chat opens over the video and
// closes again; the controls sit at the bottom within thumb reach; the room
// name is readable. Screenshots: /tmp/phone.png (call with the badge) and
// /tmp/phone-chat.png (chat open), also copied to e2e/artifacts/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync } from 'node:fs';
import { launchChromium, joinChromium } from '../lib.mjs';

const BASE = process.env.SB_URL;
assert.ok(BASE, 'SB_URL must point at a running node (run e2e/run.sh)');
const ROOM = `phone-${process.pid}`;
const PHONE = { width: 390, height: 844 };

let browser;
before(async () => { browser = await launchChromium(); });
after(async () => { await browser?.close(); });

async function joinPhone(name) {
  const context = await browser.newContext({
    viewport: PHONE, deviceScaleFactor: 2, isMobile: true, hasTouch: true,
    userAgent: 'Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Mobile Safari/537.36',
  });
  await context.grantPermissions(['camera', 'microphone']);
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') console.log(`[${name}] ${m.text()}`); });
  await page.goto(`${BASE}/r/${ROOM}`);
  await page.fill('#name', name);
  await page.tap('#join-btn');
  await page.waitForFunction(() => window.__sb && window.__sb.me, null, { timeout: 10_000 });
  return page;
}

/** framesDecoded of each inbound video stream, by stats id. */
function videoInbound(page) {
  return page.evaluate(async () => {
    const out = {};
    (await window.__sb.pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') out[s.id] = s.framesDecoded || 0;
    });
    return out;
  });
}

/** Is the element shown inside the viewport at all? */
function shownInViewport(page, selector) {
  return page.evaluate((sel) => {
    const el = document.querySelector(sel);
    if (!el || !el.checkVisibility({ opacityProperty: true, visibilityProperty: true })) return false;
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && r.right > 0 && r.bottom > 0
      && r.left < innerWidth && r.top < innerHeight;
  }, selector);
}

/**
 * Every remote (camera) tile: its box intersects the viewport, it lies inside
 * it, and elementFromPoint at its center and four inner points hits the tile
 * itself (its video, avatar or label), not the chat panel or anything else.
 */
function remoteTiles(page) {
  return page.evaluate(() => {
    const out = [];
    for (const t of document.querySelectorAll('.tile:not(.self):not([data-screen])')) {
      const r = t.getBoundingClientRect();
      const ix = Math.max(0, Math.min(r.right, innerWidth) - Math.max(r.left, 0));
      const iy = Math.max(0, Math.min(r.bottom, innerHeight) - Math.max(r.top, 0));
      const points = [[0.5, 0.5], [0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]];
      const covered = [];
      for (const [fx, fy] of points) {
        const x = r.left + r.width * fx;
        const y = r.top + r.height * fy;
        const hit = document.elementFromPoint(x, y);
        if (!hit || !t.contains(hit)) {
          covered.push(`${Math.round(x)},${Math.round(y)}: ${hit ? (hit.id || hit.tagName + '.' + hit.className) : 'nothing'}`);
        }
      }
      const v = t.querySelector('video');
      out.push({
        name: t.dataset.name,
        box: [Math.round(r.left), Math.round(r.top), Math.round(r.width), Math.round(r.height)],
        intersects: ix > 0 && iy > 0,
        inside: r.left >= -1 && r.top >= -1 && r.right <= innerWidth + 1 && r.bottom <= innerHeight + 1,
        covered,
        videoWidth: v ? v.videoWidth : 0,
        frames: v ? v.getVideoPlaybackQuality().totalVideoFrames : 0,
      });
    }
    return out;
  });
}

function assertTilesVisible(tiles, names, when) {
  assert.deepEqual(tiles.map((t) => t.name).sort(), [...names].sort(), `${when}: remote tiles`);
  for (const t of tiles) {
    assert.ok(t.intersects, `${when}: ${t.name}'s tile ${JSON.stringify(t.box)} is outside the viewport`);
    assert.ok(t.inside, `${when}: ${t.name}'s tile ${JSON.stringify(t.box)} is not wholly inside the viewport`);
    assert.deepEqual(t.covered, [], `${when}: ${t.name}'s tile ${JSON.stringify(t.box)} is covered`);
  }
}

test('a phone in a call of three sees every video first, chat as an overlay with an unread badge', async () => {
  const alice = await joinChromium(browser, BASE, ROOM, 'Alice');
  const bob = await joinChromium(browser, BASE, ROOM, 'Bob');
  const phone = await joinPhone('Pat');

  // Both remote cameras play on the phone.
  await phone.waitForFunction(() => {
    const vs = [...document.querySelectorAll('.tile:not(.self):not([data-screen]) video')];
    return window.__sb.roster.length === 3 && vs.length === 2 && vs.every((v) => v.videoWidth > 0);
  }, null, { timeout: 15_000 });

  // Chat is closed by default on a phone; no badge yet.
  assert.equal(await shownInViewport(phone, '#chat'), false, 'chat is closed right after joining');
  assert.equal(await shownInViewport(phone, '#chat-badge'), false, 'no unread badge before any message');

  // Every remote tile is visible and not covered.
  assertTilesVisible(await remoteTiles(phone), ['Alice', 'Bob'], 'after joining');

  // ...and decoding: two inbound video streams whose framesDecoded grow, and
  // each tile's <video> presents new frames.
  const v0 = await videoInbound(phone);
  const t0 = await remoteTiles(phone);
  await new Promise((r) => setTimeout(r, 1500));
  const v1 = await videoInbound(phone);
  const growing = Object.keys(v1).filter((id) => v0[id] > 0 && v1[id] > v0[id]);
  assert.ok(growing.length >= 2, `two video streams decode with frames increasing: ${JSON.stringify({ v0, v1 })}`);
  const t1 = await remoteTiles(phone);
  for (const t of t1) {
    const before = t0.find((x) => x.name === t.name);
    assert.ok(t.frames > before.frames, `${t.name}'s tile presents new frames (${before.frames} -> ${t.frames})`);
  }

  // Controls at the bottom, within thumb reach, big enough to tap, not covered.
  const controls = await phone.evaluate(() => ['mic-btn', 'cam-btn', 'screen-btn', 'chat-btn', 'leave-btn'].map((id) => {
    const el = document.getElementById(id);
    const r = el.getBoundingClientRect();
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return {
      id, top: Math.round(r.top), bottom: Math.round(r.bottom), left: Math.round(r.left), right: Math.round(r.right),
      w: Math.round(r.width), h: Math.round(r.height), vh: innerHeight, vw: innerWidth,
      visible: el.checkVisibility(), reachable: !!hit && el.contains(hit),
    };
  }));
  for (const c of controls) {
    const where = JSON.stringify(c);
    assert.ok(c.visible && c.reachable, `${c.id} is visible and not covered: ${where}`);
    assert.ok(c.left >= 0 && c.right <= c.vw && c.bottom <= c.vh, `${c.id} is inside the viewport: ${where}`);
    assert.ok(c.top >= c.vh * 0.8, `${c.id} is in the bottom fifth of the screen (thumb reach): ${where}`);
    assert.ok(c.w >= 44 && c.h >= 44, `${c.id} is at least 44×44 px: ${where}`);
  }

  // The room name is readable: shown, whole (not cut off), not tiny.
  const label = await phone.evaluate(() => {
    const el = document.getElementById('room-label');
    const r = el.getBoundingClientRect();
    return {
      text: el.textContent, visible: el.checkVisibility(),
      inside: r.left >= 0 && r.right <= innerWidth && r.top >= 0 && r.bottom <= innerHeight,
      clipped: el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1,
      fontPx: parseFloat(getComputedStyle(el).fontSize),
    };
  });
  assert.ok(label.text.includes(ROOM) && label.visible && label.inside, `room name shown: ${JSON.stringify(label)}`);
  assert.ok(!label.clipped, `room name not cut off: ${JSON.stringify(label)}`);
  assert.ok(label.fontPx >= 14, `room name at least 14 px: ${JSON.stringify(label)}`);

  // A chat message from Alice: an unread badge on the chat toggle, chat stays closed.
  await alice.fill('#chat-input', 'hello from Alice');
  await alice.press('#chat-input', 'Enter');
  await phone.waitForFunction(() => {
    const b = document.getElementById('chat-badge');
    return b.checkVisibility() && b.textContent === '1';
  }, null, { timeout: 5_000 });
  assert.equal(await shownInViewport(phone, '#chat-badge'), true, 'badge inside the viewport');
  assert.equal(await shownInViewport(phone, '#chat'), false, 'a message does not open chat');
  assertTilesVisible(await remoteTiles(phone), ['Alice', 'Bob'], 'with an unread message');

  mkdirSync(new URL('../artifacts/', import.meta.url), { recursive: true });
  const artifacts = new URL('../artifacts/', import.meta.url).pathname;
  await phone.screenshot({ path: '/tmp/phone.png' });
  copyFileSync('/tmp/phone.png', `${artifacts}phone.png`);

  // Opening chat shows it over the video, with the message; the badge goes.
  await phone.tap('#chat-btn');
  await phone.waitForFunction(() => document.getElementById('chat').checkVisibility(), null, { timeout: 2_000 });
  const open = await phone.evaluate(() => {
    const chat = document.getElementById('chat');
    const c = chat.getBoundingClientRect();
    const over = [];
    for (const t of document.querySelectorAll('.tile')) {
      const r = t.getBoundingClientRect();
      const x0 = Math.max(r.left, c.left); const x1 = Math.min(r.right, c.right);
      const y0 = Math.max(r.top, c.top); const y1 = Math.min(r.bottom, c.bottom);
      if (x1 > x0 && y1 > y0) {
        const hit = document.elementFromPoint((x0 + x1) / 2, (y0 + y1) / 2);
        over.push(!!hit && chat.contains(hit));
      }
    }
    const msg = [...chat.querySelectorAll('#chat-log .text')].find((e) => e.textContent === 'hello from Alice');
    const m = msg && msg.getBoundingClientRect();
    const btn = document.getElementById('chat-btn').getBoundingClientRect();
    const btnHit = document.elementFromPoint(btn.left + btn.width / 2, btn.top + btn.height / 2);
    return {
      box: [Math.round(c.left), Math.round(c.top), Math.round(c.width), Math.round(c.height)],
      over, messageShown: !!m && m.top >= c.top && m.bottom <= c.bottom,
      badge: document.getElementById('chat-badge').checkVisibility(),
      toggleReachable: !!btnHit && document.getElementById('chat-btn').contains(btnHit),
      input: (() => { const r = document.getElementById('chat-input').getBoundingClientRect(); return r.bottom <= innerHeight && r.top >= 0; })(),
    };
  });
  assert.ok(open.over.length > 0 && open.over.every(Boolean), `chat lies over the video: ${JSON.stringify(open)}`);
  assert.ok(open.messageShown, `Alice's message is shown in the open chat: ${JSON.stringify(open)}`);
  assert.ok(!open.badge, 'the badge is cleared when chat opens');
  assert.ok(open.toggleReachable && open.input, `chat toggle and input reachable: ${JSON.stringify(open)}`);

  // The phone can chat from the overlay.
  await phone.tap('#chat-input');
  await phone.fill('#chat-input', 'hello from the phone');
  await phone.press('#chat-input', 'Enter');
  await alice.waitForFunction(() => [...document.querySelectorAll('#chat-log .text')]
    .some((e) => e.textContent === 'hello from the phone'), null, { timeout: 5_000 });
  await phone.screenshot({ path: '/tmp/phone-chat.png' });
  copyFileSync('/tmp/phone-chat.png', `${artifacts}phone-chat.png`);

  // Closing it returns the video.
  await phone.tap('#chat-btn');
  await phone.waitForFunction(() => !document.getElementById('chat').checkVisibility(), null, { timeout: 2_000 });
  assertTilesVisible(await remoteTiles(phone), ['Alice', 'Bob'], 'after closing chat');

  // Desktop keeps its layout: chat open beside the video, not over it.
  const desk = await alice.evaluate(() => {
    const c = document.getElementById('chat').getBoundingClientRect();
    const g = document.getElementById('grid').getBoundingClientRect();
    return { chatShown: document.getElementById('chat').checkVisibility(), chatLeft: c.left, gridRight: g.right };
  });
  assert.ok(desk.chatShown && desk.chatLeft >= desk.gridRight, `desktop: chat open beside the grid: ${JSON.stringify(desk)}`);

  await phone.close();
  await bob.close();
  await alice.close();
});
