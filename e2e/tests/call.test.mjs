// Two Chromium pages in one room: video decodes and audio flows both ways,
// screen share, chat, and leave, against a real node (started by run.sh).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { launchChromium, joinChromium, inbound, waitFor, waitForAudioVideo } from '../lib.mjs';

const BASE = process.env.SB_URL;
assert.ok(BASE, 'SB_URL must point at a running node (run e2e/run.sh)');
const ROOM = `e2e-${process.pid}`;

let browser;
before(async () => {
  browser = await launchChromium(['--auto-select-desktop-capture-source=Entire screen']);
});
after(async () => { await browser?.close(); });

const joinPage = (name) => joinChromium(browser, BASE, ROOM, name);

test('two pages see and hear each other, share a screen, chat and leave', async () => {
  const alice = await joinPage('Alice');
  const bob = await joinPage('Bob');
  const aliceId = await alice.evaluate(() => window.__sb.me);

  // Video decodes and audio arrives both ways within 10 s.
  for (const [who, page] of [['Alice', alice], ['Bob', bob]]) {
    await waitForAudioVideo(who, page);
  }
  // Each page shows the other's tile with a playing video.
  await bob.waitForFunction((id) => {
    const v = document.querySelector(`.tile[data-participant-id="${id}"]:not([data-screen]) video`);
    return v && v.videoWidth > 0;
  }, aliceId, { timeout: 10_000 });

  // Screen share from Alice shows up on Bob as a screen tile that decodes.
  await alice.click('#screen-btn');
  await bob.waitForFunction((id) => {
    const v = document.querySelector(`.tile[data-screen="true"][data-participant-id="${id}"] video`);
    return v && v.videoWidth > 0;
  }, aliceId, { timeout: 15_000 });
  await waitFor('Bob decodes two video tracks', async () => {
    const s = await inbound(bob);
    return { ok: s.filter((x) => x.kind === 'video' && x.framesDecoded > 0).length >= 2, s };
  }, 10_000);

  // Chat arrives.
  await alice.fill('#chat-input', 'hello from Alice');
  await alice.press('#chat-input', 'Enter');
  await bob.waitForFunction(() => [...document.querySelectorAll('#chat-log .text')]
    .some((e) => e.textContent === 'hello from Alice'), null, { timeout: 5_000 });

  // Mute shows on the other side.
  await alice.click('#mic-btn');
  await bob.waitForFunction((id) => {
    const m = document.querySelector(`.tile[data-participant-id="${id}"]:not([data-screen]) .mic-off`);
    return m && !m.hasAttribute('hidden');
  }, aliceId, { timeout: 5_000 });

  mkdirSync(new URL('../artifacts/', import.meta.url), { recursive: true });
  await bob.screenshot({ path: new URL('../artifacts/call.png', import.meta.url).pathname });

  // Alice leaves: her tiles disappear on Bob's page.
  await alice.click('#leave-btn');
  await bob.waitForFunction((id) => !document.querySelector(`.tile[data-participant-id="${id}"]`),
    aliceId, { timeout: 10_000 });
  const roster = await bob.evaluate(() => window.__sb.roster.map((p) => p.name));
  assert.deepEqual(roster, ['Bob']);

  // A dropped signaling connection is re-established: a new session, and
  // media flows again with a participant who joins afterwards.
  const oldId = await bob.evaluate(() => window.__sb.me);
  await bob.evaluate(() => window.__sb.ws.close());
  await bob.waitForFunction((old) => window.__sb.me && window.__sb.me !== old
    && window.__sb.roster.length === 1, oldId, { timeout: 10_000 });
  const carol = await joinPage('Carol');
  await waitFor('Bob decodes Carol after reconnecting', async () => {
    const s = await inbound(bob);
    return { ok: s.some((x) => x.kind === 'video' && x.framesDecoded > 0), s };
  }, 10_000);
  await carol.close();
});
