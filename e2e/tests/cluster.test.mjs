// One room across two clustered nodes: a page on node A and a page on
// node B (started by run.sh with a shared secret, B dialing A's trunk) see
// and hear each other, and chat crosses the trunk.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { launchChromium, joinChromium, waitForAudioVideo } from '../lib.mjs';

const A = process.env.SB_URL_A;
const B = process.env.SB_URL_B;
assert.ok(A && B, 'SB_URL_A and SB_URL_B must point at two clustered nodes (run e2e/run.sh)');
const ROOM = `e2e-cluster-${process.pid}`;

let browser;
before(async () => { browser = await launchChromium(); });
after(async () => { await browser?.close(); });

test('a page on node A and a page on node B share one call', async () => {
  const ann = await joinChromium(browser, A, ROOM, 'Ann on A');
  const ben = await joinChromium(browser, B, ROOM, 'Ben on B');
  for (const [who, page] of [['Ann (node A)', ann], ['Ben (node B)', ben]]) {
    await waitForAudioVideo(who, page);
  }
  const annId = await ann.evaluate(() => window.__sb.me);
  await ben.waitForFunction((id) => {
    const v = document.querySelector(`.tile[data-participant-id="${id}"]:not([data-screen]) video`);
    return v && v.videoWidth > 0;
  }, annId, { timeout: 10_000 });

  await ann.fill('#chat-input', 'hello from node A');
  await ann.press('#chat-input', 'Enter');
  await ben.waitForFunction(() => [...document.querySelectorAll('#chat-log .text')]
    .some((e) => e.textContent === 'hello from node A'), null, { timeout: 5_000 });

  mkdirSync(new URL('../artifacts/', import.meta.url), { recursive: true });
  await ben.screenshot({ path: new URL('../artifacts/cluster.png', import.meta.url).pathname });

  await ann.close();
  await ben.waitForFunction((id) => !document.querySelector(`.tile[data-participant-id="${id}"]`),
    annId, { timeout: 10_000 });
});
