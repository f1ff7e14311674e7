// A new publisher → the first frame an existing member decodes, for
// BENCHMARKS.md (how long people in a call wait to see someone who joins).
//
// Each run: a fresh room; a receive-only viewer page joins and its
// PeerConnection connects; 1 s later a publisher page (fake camera and
// microphone) clicks "join"; first frame = that click → the first getStats
// sample (every 10 ms) on the viewer with framesDecoded > 0 for video.
// Both clocks are Date.now() of one machine, read in the pages (so the
// test's own polling, `waitFor` every 200 ms, does not enter the figure).
//
//   SB_URL=http://127.0.0.1:3000 node e2e/new-publisher-frame.mjs --runs N
import { launchChromium, openPage, waitFor } from './lib.mjs';

const args = process.argv.slice(2);
const i = args.indexOf('--runs');
const RUNS = Number(i >= 0 ? args[i + 1] : 5);
const BASE = process.env.SB_URL;
if (!BASE) {
  console.error('usage: SB_URL=... node new-publisher-frame.mjs --runs N');
  process.exit(2);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function once(browser, run) {
  const room = `npf-${run}-${process.pid}`;
  const viewer = await openPage(browser, BASE, room, 'Viewer', { receiveOnly: true });
  await viewer.click('#join-btn');
  await waitFor('viewer connected', async () => ({
    ok: await viewer.evaluate(() => window.__sb.pc?.connectionState === 'connected'),
  }), 20_000);
  await viewer.evaluate(() => {
    const ff = { firstAt: null };
    window.__ff = ff;
    (async () => {
      while (ff.firstAt === null) {
        const stats = await window.__sb.pc.getStats();
        stats.forEach((s) => {
          if (ff.firstAt === null && s.type === 'inbound-rtp' && s.kind === 'video' && s.framesDecoded > 0) {
            ff.firstAt = Date.now();
          }
        });
        await new Promise((r) => setTimeout(r, 10));
      }
    })();
  });
  await sleep(1000);
  const pub = await openPage(browser, BASE, room, 'Pub', { receiveOnly: false });
  const clickAt = await pub.evaluate(() => {
    const at = Date.now();
    document.getElementById('join-btn').click();
    return at;
  });
  const ff = await waitFor('viewer decodes the new publisher', async () => {
    const v = await viewer.evaluate(() => window.__ff);
    return { ok: v.firstAt !== null, ...v };
  }, 20_000);
  await pub.context().close();
  await viewer.context().close();
  return ff.firstAt - clickAt;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

const browser = await launchChromium([`--unsafely-treat-insecure-origin-as-secure=${BASE}`]);
const xs = [];
try {
  for (let run = 1; run <= RUNS; run += 1) {
    const ms = await once(browser, run);
    xs.push(ms);
    console.log(`run ${run}: publisher join -> viewer's first decoded frame ${ms} ms`);
  }
} finally {
  await browser.close();
}
console.log(`median ${median(xs)} ms, range ${Math.min(...xs)}..${Math.max(...xs)} ms over ${xs.length} runs [${xs.join(', ')}]`);
