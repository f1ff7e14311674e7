// A Chromium subscriber whose publishers come and go: the server reuses the
// m-line of a departed track for the next track of its kind (an inactive
// transceiver made sendonly again, keeping its old msid), and the page must
// show the new publisher's video in the new publisher's tile, decoding,
// with no more receiving transceivers than tracks received at once.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launchChromium, joinChromium, waitFor } from '../lib.mjs';

const BASE = process.env.SB_URL;
assert.ok(BASE, 'SB_URL must point at a running node (run e2e/run.sh)');
const ROOM = `reuse-${process.pid}`;

let browser;
before(async () => { browser = await launchChromium(); });
after(async () => { await browser?.close(); });

/** Frames decoded by the <video> of `id`'s camera tile on `page` (0 if none). */
const tileFrames = (page, id) => page.evaluate((pid) => {
  const v = document.querySelector(`.tile[data-participant-id="${pid}"]:not([data-screen]) video`);
  if (!v || v.videoWidth === 0) return 0;
  return v.getVideoPlaybackQuality().totalVideoFrames;
}, id);

test('a departed publisher\'s m-lines carry the next publisher\'s media', async () => {
  const viewer = await joinChromium(browser, BASE, ROOM, 'Viewer');
  for (const name of ['First', 'Second', 'Third']) {
    const p = await joinChromium(browser, BASE, ROOM, name);
    const id = await p.evaluate(() => window.__sb.me);
    const seen = await waitFor(`Viewer decodes ${name} in ${name}'s tile`,
      async () => { const f = await tileFrames(viewer, id); return { ok: f > 0, f }; }, 15_000);
    await waitFor(`${name}'s frames keep coming`, async () => {
      const f = await tileFrames(viewer, id);
      return { ok: f >= seen.f + 30, f };
    }, 10_000);
    const name2 = await viewer.evaluate((pid) => document
      .querySelector(`.tile[data-participant-id="${pid}"] .name`)?.textContent, id);
    assert.ok(name2 && name2.includes(name), `tile of ${name} is labelled ${name2}`);
    await p.click('#leave-btn');
    await p.context().close();
    await viewer.waitForFunction((pid) => !document.querySelector(`.tile[data-participant-id="${pid}"]`),
      id, { timeout: 10_000 });
  }
  // Three publishers came and went: one audio and one video m-line received.
  const receiving = await viewer.evaluate(() => window.__sb.pc.getTransceivers()
    .filter((t) => !t.sb_source && t.mid !== null).length);
  assert.equal(receiving, 2, 'receiving transceivers');
});
