// ICE-TCP fallback (RFC 6544): two Chromium pages in one call, run by
// e2e/tcp.sh inside a network namespace whose UDP to the node is dropped
// (iptables): each page decodes the other's video and audio, and the
// selected candidate pair is TCP on both ends. With SB_EXPECT_PROTO=udp
// (the same namespace without the rule) the pair must be UDP: TCP is only
// the fallback.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launchChromium, joinChromium, waitFor } from '../lib.mjs';

const BASE = process.env.SB_URL;
assert.ok(BASE, 'SB_URL must point at a running node (run e2e/tcp.sh)');
const PROTO = process.env.SB_EXPECT_PROTO || 'tcp';
assert.ok(['tcp', 'udp'].includes(PROTO), `SB_EXPECT_PROTO=${PROTO}`);
const ROOM = `e2e-${PROTO}-${process.pid}`;

let browser;
before(async () => {
  // The node is on a namespace's veth address: let plain http there count
  // as a secure context (getUserMedia).
  browser = await launchChromium([`--unsafely-treat-insecure-origin-as-secure=${BASE}`]);
});
after(async () => { await browser?.close(); });

/** Inbound audio/video stats and the selected candidate pair's two ends. */
async function transport(page) {
  return page.evaluate(async () => {
    const pc = window.__sb.pc;
    if (!pc) return { inbound: [], pair: null };
    const stats = await pc.getStats();
    const inbound = [];
    let pairId = null;
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp') {
        inbound.push({
          kind: s.kind,
          framesDecoded: s.framesDecoded || 0,
          packetsReceived: s.packetsReceived || 0,
          samples: s.totalSamplesReceived || 0,
        });
      }
      if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
    });
    const pair = pairId && stats.get(pairId);
    const end = (id) => {
      const c = id && stats.get(id);
      return c ? { protocol: c.protocol, type: c.candidateType, tcpType: c.tcpType || null,
        address: c.address, port: c.port } : null;
    };
    return {
      inbound,
      pair: pair ? { state: pair.state, local: end(pair.localCandidateId),
        remote: end(pair.remoteCandidateId) } : null,
    };
  });
}

test(`two pages see and hear each other over ${PROTO.toUpperCase()}`, async () => {
  const started = Date.now();
  const pages = [['Alice', await joinChromium(browser, BASE, ROOM, 'Alice')],
    ['Bob', await joinChromium(browser, BASE, ROOM, 'Bob')]];
  for (const [who, page] of pages) {
    const got = await waitFor(`${who} decodes video and audio over ${PROTO}`, async () => {
      const t = await transport(page);
      const video = t.inbound.some((x) => x.kind === 'video' && x.framesDecoded > 0);
      const audio = t.inbound.some((x) => x.kind === 'audio' && x.packetsReceived > 0 && x.samples > 0);
      return { ok: video && audio && !!t.pair, ...t };
    }, 20_000);
    const v = got.inbound.find((x) => x.kind === 'video');
    const a = got.inbound.find((x) => x.kind === 'audio');
    const { local, remote } = got.pair;
    console.log(`${who}: ${v.framesDecoded} video frames decoded, ${a.packetsReceived} audio packets `
      + `(${a.samples} samples) after ${Date.now() - started} ms; selected pair `
      + `local ${local.protocol}${local.tcpType ? `/${local.tcpType}` : ''} ${local.type} -> `
      + `remote ${remote.protocol}${remote.tcpType ? `/${remote.tcpType}` : ''} ${remote.type} `
      + `${remote.address}:${remote.port}`);
    assert.equal(local.protocol, PROTO, `${who}: local candidate ${JSON.stringify(local)}`);
    assert.equal(remote.protocol, PROTO, `${who}: remote candidate ${JSON.stringify(remote)}`);
    if (PROTO === 'tcp') assert.equal(remote.tcpType, 'passive', `${who}: ${JSON.stringify(remote)}`);
  }
  // Frames keep coming (not just one that slipped through).
  const [, bob] = pages[1];
  const before = (await transport(bob)).inbound.find((x) => x.kind === 'video').framesDecoded;
  await waitFor('Bob keeps decoding', async () => {
    const now = (await transport(bob)).inbound.find((x) => x.kind === 'video').framesDecoded;
    return { ok: now >= before + 20, before, now };
  }, 10_000);
  for (const [, page] of pages) await page.context().close();
});
