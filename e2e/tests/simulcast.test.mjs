// A Chromium publisher that asks for simulcast (three sendEncodings, rids
// q/h/f) against a node that does not support it yet: the answer carries no
// simulcast, the browser sends one layer, and a viewer decodes it at the
// rate it is sent (accepted, the three layers used to feed one rewriter:
// ~19 of 30 frames/s, resolution changing from run to run).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launchChromium, joinChromium, waitFor } from '../lib.mjs';

const BASE = process.env.SB_URL;
assert.ok(BASE, 'SB_URL must point at a running node (run e2e/run.sh)');
const ROOM = `simulcast-${process.pid}`;

let browser;
before(async () => { browser = await launchChromium(); });
after(async () => { await browser?.close(); });

// In the publisher's page, before the web client loads: every sending video
// transceiver asks for three simulcast layers, and every remote description
// the page applies is kept for the test to read.
function simulcastPublisher() {
  window.__remoteSdps = [];
  const addTransceiver = RTCPeerConnection.prototype.addTransceiver;
  RTCPeerConnection.prototype.addTransceiver = function (trackOrKind, init = {}) {
    const kind = typeof trackOrKind === 'string' ? trackOrKind : trackOrKind.kind;
    if (kind === 'video' && init.direction === 'sendonly' && !init.sendEncodings) {
      init = {
        ...init,
        sendEncodings: [
          { rid: 'q', scaleResolutionDownBy: 4 },
          { rid: 'h', scaleResolutionDownBy: 2 },
          { rid: 'f' },
        ],
      };
    }
    return addTransceiver.call(this, trackOrKind, init);
  };
  const setRemote = RTCPeerConnection.prototype.setRemoteDescription;
  RTCPeerConnection.prototype.setRemoteDescription = function (desc) {
    if (desc && desc.sdp) window.__remoteSdps.push({ type: desc.type, sdp: desc.sdp });
    return setRemote.call(this, desc);
  };
}

async function videoStats(page, type) {
  return page.evaluate(async (type) => {
    const out = [];
    (await window.__sb.pc.getStats()).forEach((s) => {
      if (s.type === type && s.kind === 'video') {
        out.push({
          rid: s.rid || null,
          frames: (type === 'inbound-rtp' ? s.framesDecoded : s.framesEncoded) || 0,
          bytes: (type === 'inbound-rtp' ? s.bytesReceived : s.bytesSent) || 0,
          w: s.frameWidth || 0,
          h: s.frameHeight || 0,
        });
      }
    });
    return out;
  }, type);
}

test('a simulcast offer is answered without simulcast and the viewer gets the full frame rate', async () => {
  const context = await browser.newContext();
  await context.grantPermissions(['camera', 'microphone']);
  await context.addInitScript(simulcastPublisher);
  const pub = await context.newPage();
  await pub.goto(`${BASE}/r/${ROOM}`);
  await pub.fill('#name', 'Simone');
  await pub.click('#join-btn');
  await pub.waitForFunction(() => window.__sb && window.__sb.me, null, { timeout: 10_000 });
  const viewer = await joinChromium(browser, BASE, ROOM, 'Viewer');

  await waitFor('the viewer decodes video', async () => {
    const s = await videoStats(viewer, 'inbound-rtp');
    return { ok: s.some((x) => x.frames > 10), s };
  }, 15_000);

  // The node's answers to the publisher's offers carry no simulcast.
  const answers = await pub.evaluate(() => window.__remoteSdps.filter((d) => d.type === 'answer'));
  assert.ok(answers.length >= 1);
  for (const a of answers) {
    assert.ok(!/a=simulcast/.test(a.sdp), `answer with simulcast:\n${a.sdp}`);
    assert.ok(!/a=rid:/.test(a.sdp), `answer with rids:\n${a.sdp}`);
  }
  // Over 5 s: the publisher sends one layer, and the viewer decodes (about)
  // every frame of it.
  const p0 = await videoStats(pub, 'outbound-rtp');
  const v0 = await videoStats(viewer, 'inbound-rtp');
  await new Promise((r) => setTimeout(r, 5000));
  const p1 = await videoStats(pub, 'outbound-rtp');
  const v1 = await videoStats(viewer, 'inbound-rtp');
  const sending = p1.filter((x) => x.bytes > (p0.find((y) => y.rid === x.rid)?.bytes ?? 0));
  assert.equal(sending.length, 1, `one layer sent: ${JSON.stringify(p1)}`);
  const sent = sending[0].frames - (p0.find((y) => y.rid === sending[0].rid)?.frames ?? 0);
  const decoded = v1.reduce((a, x) => a + x.frames, 0) - v0.reduce((a, x) => a + x.frames, 0);
  console.log(`# publisher encoded ${sent} frames in 5 s, viewer decoded ${decoded} (${JSON.stringify(v1)})`);
  assert.ok(sent >= 50, `the publisher sends video: ${sent} frames in 5 s`);
  assert.ok(decoded >= 0.9 * sent, `viewer decoded ${decoded} of ${sent} frames`);
  const sizes = new Set(v1.map((x) => `${x.w}x${x.h}`));
  assert.equal(sizes.size, 1, `one resolution: ${[...sizes]}`);
  await viewer.close();
  await pub.close();
  await context.close();
});
