// HTTPS and WSS built into the node, as a browser on another machine sees
// it: the node serves https:// on a non-loopback address (10.77.0.1 in the
// network namespace run.sh creates) with a certificate from a test CA that
// Chromium does not know. Chromium is told to trust only that certificate's
// key (--ignore-certificate-errors-spki-list), never to treat an insecure
// origin as secure, so the camera works only because the page really is a
// secure context. Then the certificate is renewed on disk and the node told
// with SIGHUP: the call goes on over the same WSS socket and media
// transport, new TLS connections get the new certificate, and a page that
// joins afterwards (over the new certificate) sees and hears the others.
//
// env: SB_URL (https://10.77.0.1:PORT), SB_PID (the node's pid), TLS_DIR
// (cert.pem + key.pem the node serves; next.pem + next-key.pem the renewal),
// SB_SPKI (base64 SHA-256 SPKI hashes of both leaf certificates, comma-separated).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { copyFileSync, readFileSync, renameSync } from 'node:fs';
import tls from 'node:tls';
import { launchChromium, joinChromium, inbound, waitFor, waitForAudioVideo } from '../lib.mjs';

const BASE = process.env.SB_URL;
const PID = Number(process.env.SB_PID);
const DIR = process.env.TLS_DIR;
const SPKI = process.env.SB_SPKI;
assert.ok(BASE && BASE.startsWith('https://') && PID && DIR && SPKI, 'SB_URL (https), SB_PID, TLS_DIR and SB_SPKI are set by run.sh');
const ROOM = `https-${process.pid}`;

let browser;
before(async () => {
  browser = await launchChromium([`--ignore-certificate-errors-spki-list=${SPKI}`]);
});
after(async () => { await browser?.close(); });

/** SHA-256 fingerprint of the certificate a fresh TLS connection to the node presents. */
function servedFingerprint() {
  const u = new URL(BASE);
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: u.hostname, port: Number(u.port), rejectUnauthorized: false }, () => {
      const fp = s.getPeerCertificate().fingerprint256;
      s.end();
      resolve(fp);
    });
    s.on('error', reject);
  });
}
const fileFingerprint = (name) => new X509Certificate(readFileSync(`${DIR}/${name}`)).fingerprint256;

/** Sum of video frames decoded on `page`. */
async function framesDecoded(page) {
  return (await inbound(page)).filter((s) => s.kind === 'video').reduce((n, s) => n + s.framesDecoded, 0);
}

test('a call over https:// and wss:// on a non-loopback address survives a certificate renewal', async () => {
  assert.equal(await servedFingerprint(), fileFingerprint('cert.pem'), 'the node serves cert.pem');
  const alice = await joinChromium(browser, BASE, ROOM, 'Alice');
  const bob = await joinChromium(browser, BASE, ROOM, 'Bob');
  for (const page of [alice, bob]) {
    const where = await page.evaluate(() => ({
      protocol: location.protocol, secure: window.isSecureContext, ws: window.__sb.ws.url,
    }));
    assert.equal(where.protocol, 'https:', JSON.stringify(where));
    assert.equal(where.secure, true, JSON.stringify(where));
    assert.ok(where.ws.startsWith('wss://10.77.0.1:'), JSON.stringify(where));
  }
  await waitForAudioVideo('Alice', alice);
  await waitForAudioVideo('Bob', bob);
  // Keep the socket objects: a reconnect would replace them.
  for (const page of [alice, bob]) await page.evaluate(() => { window.__wsBefore = window.__sb.ws; });

  // Renew: the new pair is written next to the old and renamed over it
  // (what certbot-style tools do), then SIGHUP.
  copyFileSync(`${DIR}/next.pem`, `${DIR}/cert.pem.tmp`);
  copyFileSync(`${DIR}/next-key.pem`, `${DIR}/key.pem.tmp`);
  renameSync(`${DIR}/key.pem.tmp`, `${DIR}/key.pem`);
  renameSync(`${DIR}/cert.pem.tmp`, `${DIR}/cert.pem`);
  process.kill(PID, 'SIGHUP');
  const renewed = fileFingerprint('cert.pem');
  await waitFor('new TLS connections get the renewed certificate', async () => {
    const fp = await servedFingerprint();
    return { ok: fp === renewed, fp, renewed };
  }, 10_000);

  // The call goes on: same sockets, open, and frames keep decoding.
  const before = { alice: await framesDecoded(alice), bob: await framesDecoded(bob) };
  await waitFor('frames keep decoding after the renewal', async () => {
    const now = { alice: await framesDecoded(alice), bob: await framesDecoded(bob) };
    return { ok: now.alice >= before.alice + 40 && now.bob >= before.bob + 40, before, now };
  }, 15_000);
  for (const [who, page] of [['Alice', alice], ['Bob', bob]]) {
    const kept = await page.evaluate(() => window.__sb.ws === window.__wsBefore && window.__sb.ws.readyState === WebSocket.OPEN
      && window.__sb.pc.connectionState === 'connected');
    assert.ok(kept, `${who}'s WSS socket or media transport was replaced or closed by the renewal`);
  }

  // A page that arrives now loads over the renewed certificate and joins.
  const carol = await joinChromium(browser, BASE, ROOM, 'Carol');
  await waitForAudioVideo('Carol', carol);
  assert.equal(await carol.evaluate(() => window.isSecureContext), true);
});
