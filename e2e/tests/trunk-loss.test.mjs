// Loss repair on the trunk: node B's trunk to node A crosses a UDP proxy
// (switchboard-impair, 3 % loss each way, seeded), started by run.sh. A
// publisher and a subscriber on A, a subscriber on B (trunk-quality.mjs).
// Over a 20 s window the subscriber on B must decode at least 90 % as many of
// the publisher's frames as the subscriber on A (the same node, no trunk),
// and B's /metrics must show that trunk packets were repaired; and lip sync
// on B must match A's: the median A/V offset (video minus audio) of the
// publisher's microphone + camera at B may differ from A's by at most
// MAX_AV_DIFF_MS (trunk-quality.mjs av_sync, measured by RTP timestamp on one
// clock, not through the nodes' sender reports: see avSync() there). B keeps
// the origin's audio/video timing only if its sender reports carry the time
// the origin received each packet; with a wrong wallclock, differences
// between the trunk's delays of audio and video (queues, loss repair) move
// lip sync on B.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { measureTrunkQuality, TABLE_HEADER, tableRow } from '../trunk-quality.mjs';

/** Substring of the name of B's counter of trunk packets repaired (NACK + resend). */
const REPAIR_COUNTER = 'repaired';
const MIN_RATIO = 0.9;
const WINDOW_S = 20;
/** Largest |B - A| of the median A/V offsets, ms (loose: see above). */
const MAX_AV_DIFF_MS = 40;

const A = process.env.SB_URL_A;
const B = process.env.SB_URL_B;
assert.ok(A && B, 'SB_URL_A and SB_URL_B must point at two clustered nodes whose trunk crosses the impairment proxy (run e2e/run.sh)');

/** Every sample of B's /metrics whose metric name contains REPAIR_COUNTER. */
async function repairCounters(base) {
  const text = await (await fetch(`${base}/metrics`)).text();
  const out = {};
  for (const line of text.split('\n')) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (m && m[1].includes(REPAIR_COUNTER)) out[m[1] + (m[2] || '')] = Number(m[3]);
  }
  return out;
}

test('3 % loss on the trunk: B decodes ≥ 90 % of the frames A does, B repairs, and B keeps A\'s lip sync', async () => {
  const before = await repairCounters(B);
  const r = await measureTrunkQuality({ a: A, b: B, windowS: WINDOW_S, warmupS: 5, label: 'trunk 3% loss (test)' });
  const after = await repairCounters(B);

  mkdirSync(new URL('../artifacts/', import.meta.url), { recursive: true });
  writeFileSync(new URL('../artifacts/trunk-loss.json', import.meta.url), `${JSON.stringify(r)}\n`);
  console.log(`${TABLE_HEADER}\n${tableRow(r)}`);

  // All conditions are checked and reported together.
  const failures = [];
  if (!(r.A.frames > 0)) failures.push(`the subscriber on A decoded nothing: ${JSON.stringify(r.A)}`);
  if (!(r.B.frames >= MIN_RATIO * r.A.frames)) {
    failures.push(`B decoded ${r.B.frames} frames, A ${r.A.frames}: below ${MIN_RATIO * 100} % `
      + `(B stalled ${r.B.stalled_s} s, lost ${r.B.lost}, nacks ${r.B.nacks})`);
  }
  const grew = Object.keys(after).filter((k) => after[k] > (before[k] ?? 0));
  if (grew.length === 0) {
    failures.push(`no metric on B whose name contains "${REPAIR_COUNTER}" increased; before ${JSON.stringify(before)}, `
      + `after ${JSON.stringify(after)}; B's trunk metrics over the window: ${JSON.stringify(r.metrics.B)}`);
  }
  const av = r.av_sync;
  const avText = () => `A/V offset (video minus audio, ms): A median ${av.A?.median_ms} (p90 |x| ${av.A?.p90_abs_ms}), `
    + `B median ${av.B?.median_ms} (p90 |x| ${av.B?.p90_abs_ms}); B − A ${av.b_minus_a_ms} `
    + `(audio delay B adds ${av.audio_delay_b_minus_a_ms}, video ${av.video_delay_b_minus_a_ms}; `
    + `on screen: B − A ${av.display_b_minus_a_ms}; Chrome's estimatedPlayoutTimestamp: B − A ${av.est_b_minus_a_ms}; `
    + `ticks A ${av.A?.ticks} (frozen ${av.A?.frozen}), B ${av.B?.ticks} (frozen ${av.B?.frozen}))`;
  if (!av || av.error || av.b_minus_a_ms === null) {
    failures.push(`no A/V offset measured: ${av && av.error ? av.error : avText()}`);
  } else if (!(Math.abs(av.b_minus_a_ms) <= MAX_AV_DIFF_MS)) {
    failures.push(`lip sync on B differs from A's by ${av.b_minus_a_ms} ms (more than ${MAX_AV_DIFF_MS}): ${avText()}`);
  } else {
    console.log(avText());
  }
  assert.deepEqual(failures, []);
});
