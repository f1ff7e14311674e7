// Join -> first decoded frame over UDP and over ICE-TCP, for BENCHMARKS.md.
// Run by `e2e/tcp.sh --measure N` inside the browser's namespace (root: it
// switches the iptables rule that drops UDP to the node between runs).
//
// Each run, for each transport (the order alternates run by run): a fresh
// room; a publisher page (fake camera and microphone) joins and is
// sending over that transport; 1.5 s later a receive-only subscriber
// page clicks "join"; first frame = click -> the first getStats sample
// (every 10 ms) with framesDecoded > 0 for the publisher's video. Both
// pages' selected candidate pairs are checked to be of that transport.
//
//   node tcp-first-frame.mjs --runs N --block "<iptables args>" --unblock "<iptables args>"
// env: SB_URL (the node), CHROMIUM.
import { execFileSync } from 'node:child_process';
import { launchChromium, openPage } from './lib.mjs';

const args = process.argv.slice(2);
const opt = (name) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const RUNS = Number(opt('--runs') || 5);
const BLOCK = (opt('--block') || '').split(' ').filter(Boolean);
const UNBLOCK = (opt('--unblock') || '').split(' ').filter(Boolean);
const BASE = process.env.SB_URL;
if (!BASE || BLOCK.length < 2 || UNBLOCK.length < 2) {
  console.error('usage: SB_URL=... node tcp-first-frame.mjs --runs N --block "iptables ..." --unblock "iptables ..."');
  process.exit(2);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let blocked = false;
function setBlocked(want) {
  if (want === blocked) return;
  const [cmd, ...rest] = want ? BLOCK : UNBLOCK;
  execFileSync(cmd, rest, { stdio: 'inherit' });
  blocked = want;
}

async function until(what, fn, timeoutMs) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last && last.ok) return last;
    await sleep(50);
  }
  throw new Error(`${what}: not within ${timeoutMs} ms; last ${JSON.stringify(last)}`);
}

/** Selected pair's local protocol and outbound video frames of a page. */
function pageTransport(page) {
  return page.evaluate(async () => {
    const pc = window.__sb && window.__sb.pc;
    if (!pc) return { proto: null, encoded: 0 };
    const stats = await pc.getStats();
    let pairId = null;
    let encoded = 0;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
      if (s.type === 'outbound-rtp' && s.kind === 'video') encoded = Math.max(encoded, s.framesEncoded || 0);
    });
    const pair = pairId && stats.get(pairId);
    const local = pair && stats.get(pair.localCandidateId);
    return { proto: local ? local.protocol : null, encoded };
  });
}

async function once(browser, proto, run) {
  setBlocked(proto === 'tcp');
  const room = `ff-${proto}-${run}-${process.pid}`;
  const pub = await openPage(browser, BASE, room, 'Pub', { receiveOnly: false });
  await pub.click('#join-btn');
  await until(`publisher sending over ${proto}`, async () => {
    const t = await pageTransport(pub);
    return { ok: t.proto === proto && t.encoded > 0, ...t };
  }, 20_000);
  await sleep(1500);
  const sub = await openPage(browser, BASE, room, 'Sub', { receiveOnly: true });
  await sub.evaluate(() => {
    const ff = { clickAt: performance.now(), firstAt: null };
    window.__ff = ff;
    (async () => {
      while (ff.firstAt === null) {
        const pc = window.__sb.pc;
        if (pc) {
          const stats = await pc.getStats();
          stats.forEach((s) => {
            if (ff.firstAt === null && s.type === 'inbound-rtp' && s.kind === 'video' && s.framesDecoded > 0) {
              ff.firstAt = performance.now();
            }
          });
        }
        await new Promise((r) => setTimeout(r, 10));
      }
    })();
    document.getElementById('join-btn').click();
  });
  const ff = await until(`subscriber decodes over ${proto}`, async () => {
    const v = await sub.evaluate(() => window.__ff);
    return { ok: v.firstAt !== null, ...v };
  }, 20_000);
  const got = (await pageTransport(sub)).proto;
  if (got !== proto) throw new Error(`run ${run}: subscriber's pair is ${got}, not ${proto}`);
  await sub.context().close();
  await pub.context().close();
  return Math.round(ff.firstAt - ff.clickAt);
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

const browser = await launchChromium([`--unsafely-treat-insecure-origin-as-secure=${BASE}`]);
const results = { udp: [], tcp: [] };
try {
  for (let run = 1; run <= RUNS; run += 1) {
    const order = run % 2 ? ['udp', 'tcp'] : ['tcp', 'udp'];
    for (const proto of order) {
      const ms = await once(browser, proto, run);
      results[proto].push(ms);
      console.log(`run ${run} ${proto}: join -> first decoded frame ${ms} ms`);
    }
  }
} finally {
  setBlocked(false);
  await browser.close();
}
for (const proto of ['udp', 'tcp']) {
  const xs = results[proto];
  console.log(`${proto}: median ${median(xs)} ms, range ${Math.min(...xs)}..${Math.max(...xs)} ms over ${xs.length} runs [${xs.join(', ')}]`);
}
console.log(`tcp - udp (medians): ${median(results.tcp) - median(results.udp)} ms`);
