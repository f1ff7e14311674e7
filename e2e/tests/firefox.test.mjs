// A mixed call: one Firefox page (Debian firefox-esr, driven over WebDriver
// BiDi by puppeteer-core) and one Chromium page (playwright-core) in one
// room: each decodes the other's video and receives the other's audio, and
// chat crosses. Firefox needs three prefs here (see docs/ARCHITECTURE.md,
// "Measured facts"): fake media devices, no permission prompt, and
// `media.peerconnection.ice.loopback` so it pairs with our 127.0.0.1
// candidate.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import puppeteer from 'puppeteer-core';

const BASE = process.env.SB_URL;
assert.ok(BASE, 'SB_URL must point at a running node (run e2e/run.sh)');
const ROOM = `e2e-ff-${process.pid}`;
const FIREFOX = process.env.FIREFOX || '/usr/lib/firefox-esr/firefox-esr';

let chrome;
let firefox;
before(async () => {
  chrome = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--headless=new', '--no-sandbox', '--disable-gpu',
      '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
      // The node is on a test namespace's veth address (Firefox will not
      // use loopback): let plain http there count as a secure context.
      `--unsafely-treat-insecure-origin-as-secure=${BASE}`,
      '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync',
    ],
  });
  firefox = await puppeteer.launch({
    browser: 'firefox',
    executablePath: FIREFOX,
    headless: true,
    extraPrefsFirefox: {
      'media.navigator.streams.fake': true,
      'media.navigator.permission.disabled': true,
      'dom.securecontext.allowlist': new URL(BASE).hostname,
    },
  });
});
after(async () => {
  await chrome?.close();
  await firefox?.close();
});

/** Join through the UI; the page objects of both drivers share these calls. */
async function join(page, name) {
  await page.goto(`${BASE}/r/${ROOM}`);
  await page.waitForSelector('#name');
  await page.focus('#name');
  await page.keyboard.type(name);
  await page.click('#join-btn');
  await page.waitForFunction(() => window.__sb && window.__sb.me, { timeout: 10_000 });
  return page.evaluate(() => window.__sb.me);
}

async function inbound(page) {
  return page.evaluate(async () => {
    const pc = window.__sb.pc;
    if (!pc) return [];
    const out = [];
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp') {
        out.push({ kind: s.kind, framesDecoded: s.framesDecoded || 0, packetsReceived: s.packetsReceived || 0 });
      }
    });
    return out;
  });
}

async function waitFor(what, fn, timeoutMs) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last.ok) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  assert.fail(`${what}: not within ${timeoutMs} ms; last seen ${JSON.stringify(last)}`);
}

test('Firefox and Chromium in one call see and hear each other and chat', async () => {
  const fx = await firefox.newPage();
  fx.on('console', (m) => { if (m.type() === 'error') console.log(`[firefox] ${m.text()}`); });
  const context = await chrome.newContext();
  await context.grantPermissions(['camera', 'microphone']);
  const cr = await context.newPage();
  cr.on('console', (m) => { if (m.type() === 'error') console.log(`[chromium] ${m.text()}`); });

  // Playwright's waitForFunction takes (fn, arg, options); puppeteer's
  // (fn, options, ...args): join() passes only options, so wrap Chromium's.
  const crCompat = Object.create(cr, {
    waitForFunction: { value: (fn, opts) => cr.waitForFunction(fn, null, opts) },
    focus: { value: (sel) => cr.focus(sel) },
  });
  const fxId = await join(fx, 'Fiona');
  const crId = await join(crCompat, 'Chris');
  assert.notEqual(fxId, crId);

  for (const [who, page] of [['Firefox', fx], ['Chromium', cr]]) {
    await waitFor(`${who} decodes video and receives audio`, async () => {
      const s = await inbound(page);
      const video = s.some((x) => x.kind === 'video' && x.framesDecoded > 0);
      const audio = s.some((x) => x.kind === 'audio' && x.packetsReceived > 0);
      return { ok: video && audio, s };
    }, 10_000);
  }

  await fx.focus('#chat-input');
  await fx.keyboard.type('hello from Firefox');
  await fx.keyboard.press('Enter');
  await cr.waitForFunction(() => [...document.querySelectorAll('#chat-log .text')]
    .some((e) => e.textContent === 'hello from Firefox'), null, { timeout: 5_000 });

  const names = await fx.evaluate(() => window.__sb.roster.map((p) => p.name).sort());
  assert.deepEqual(names, ['Chris', 'Fiona']);
  await context.close();
});
