// Helpers shared by the browser tests.
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

/** Debian Chromium with fake camera/mic (flags: ../shared/e2e-notes.md). */
export function launchChromium(extraArgs = []) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--headless=new', '--no-sandbox', '--disable-gpu',
      '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
      '--allow-loopback-in-peer-connection',
      '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync',
      ...extraArgs,
    ],
  });
}

/** A Chromium page (playwright) joined to `room` on the node at `base`. */
export async function joinChromium(browser, base, room, name) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.grantPermissions(['camera', 'microphone']);
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') console.log(`[${name}] ${m.text()}`); });
  await page.goto(`${base}/r/${room}`);
  await page.fill('#name', name);
  await page.click('#join-btn');
  await page.waitForFunction(() => window.__sb && window.__sb.me, null, { timeout: 10_000 });
  return page;
}

/** inbound-rtp stats of the page's PeerConnection (works with either driver). */
export async function inbound(page) {
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

/** Poll `fn` until it returns {ok: true}, or fail with the last value seen. */
export async function waitFor(what, fn, timeoutMs) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last.ok) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  assert.fail(`${what}: not within ${timeoutMs} ms; last seen ${JSON.stringify(last)}`);
}

/** Wait until `page` decodes video and receives audio from someone. */
export async function waitForAudioVideo(who, page, timeoutMs = 10_000) {
  return waitFor(`${who} decodes video and receives audio`, async () => {
    const s = await inbound(page);
    const video = s.some((x) => x.kind === 'video' && x.framesDecoded > 0);
    const audio = s.some((x) => x.kind === 'audio' && x.packetsReceived > 0);
    return { ok: video && audio, s };
  }, timeoutMs);
}

/** A page on `room` at `base` with `name` filled in, not yet joined; a
 * receive-only page is refused the camera and microphone (measurements). */
export async function openPage(browser, base, room, name, { receiveOnly }) {
  const context = await browser.newContext({ viewport: { width: 960, height: 600 } });
  await context.grantPermissions(['camera', 'microphone']);
  if (receiveOnly) {
    await context.addInitScript(() => {
      navigator.mediaDevices.getUserMedia = () =>
        Promise.reject(new DOMException('receive-only measurement page', 'NotAllowedError'));
    });
  }
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') console.error(`[${name}] ${m.text()}`); });
  page.on('pageerror', (e) => console.error(`[${name}] ${e}`));
  // A receive-only page never fires "load": the lobby preview <video> gets an
  // empty MediaStream, which delays the load event indefinitely.
  await page.goto(`${base}/r/${room}`, { waitUntil: receiveOnly ? 'domcontentloaded' : 'load' });
  await page.waitForFunction(() => !!window.__sb);
  await page.fill('#name', name);
  return page;
}
