// A mixed call: one Firefox page (Debian firefox-esr, driven over WebDriver
// BiDi by puppeteer-core) and one Chromium page (playwright-core) in one
// room: each decodes the other's video and receives the other's audio, and
// chat crosses. Firefox never uses loopback for WebRTC, so run.sh starts
// this node on a veth address in a namespace of its own (see
// docs/ARCHITECTURE.md, "Measured facts").
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import puppeteer from 'puppeteer-core';
import { launchChromium, waitForAudioVideo } from '../lib.mjs';

const BASE = process.env.SB_URL;
assert.ok(BASE, 'SB_URL must point at a running node (run e2e/run.sh)');
const ROOM = `e2e-ff-${process.pid}`;
const FIREFOX = process.env.FIREFOX || '/usr/lib/firefox-esr/firefox-esr';

let chrome;
let firefox;
before(async () => {
  // The node is on a test namespace's veth address (Firefox will not use
  // loopback): let plain http there count as a secure context.
  chrome = await launchChromium([`--unsafely-treat-insecure-origin-as-secure=${BASE}`]);
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
    await waitForAudioVideo(who, page);
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
