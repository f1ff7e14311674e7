// One room across clustered nodes (started by run.sh with a shared secret;
// B dials A, C dials A and B): a page on node A and a page on node B see and
// hear each other and chat crosses the trunk; then a page on node C joins
// and every page shows each other participant exactly once — the earlier
// design's duplicate tracks with three or more nodes.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { launchChromium, joinChromium, inbound, waitFor, waitForAudioVideo } from '../lib.mjs';

const A = process.env.SB_URL_A;
const B = process.env.SB_URL_B;
const C = process.env.SB_URL_C;
assert.ok(A && B && C, 'SB_URL_A, _B and _C must point at three clustered nodes (run e2e/run.sh)');
const ROOM = `e2e-cluster-${process.pid}`;

let browser;
before(async () => { browser = await launchChromium(); });
after(async () => { await browser?.close(); });

test('pages on three clustered nodes share one call, each participant shown once', async () => {
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

  // A third node: Cat on C. Each page then shows exactly the two others'
  // camera tiles, each decoding, and each page receives two videos.
  const cat = await joinChromium(browser, C, ROOM, 'Cat on C');
  for (const [who, page] of [['Ann', ann], ['Ben', ben], ['Cat', cat]]) {
    await waitFor(`${who} decodes both other participants`, async () => {
      const tiles = await page.evaluate(() => [...document.querySelectorAll('.tile:not([data-screen])')]
        .map((t) => ({ id: t.dataset.participantId, playing: (t.querySelector('video')?.videoWidth || 0) > 0 })));
      const s = await inbound(page);
      const decoding = s.filter((x) => x.kind === 'video' && x.framesDecoded > 0).length;
      const ids = tiles.map((t) => t.id);
      const unique = new Set(ids).size === ids.length;
      return { ok: tiles.length === 3 && unique && tiles.every((t) => t.playing) && decoding === 2, tiles, decoding };
    }, 15_000);
  }

  mkdirSync(new URL('../artifacts/', import.meta.url), { recursive: true });
  await ben.screenshot({ path: new URL('../artifacts/cluster.png', import.meta.url).pathname });
  await cat.close();

  await ann.close();
  await ben.waitForFunction((id) => !document.querySelector(`.tile[data-participant-id="${id}"]`),
    annId, { timeout: 10_000 });
});
