// Server restarts, crashes and expiring sessions, with real processes.

import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import WebSocket from "ws";
import { GoneError, UnauthorizedError, connect } from "../src/backstream-client.js";
import { LOREM, collect, contiguous, mintJwt, startServer } from "./helpers.js";

// Two servers of their own: the tests run side by side.
describe("recovery", { concurrency: true }, () => {
  test("a server restart (1001) and a crash (kill -9): resume, and go on across the recovery", async () => {
    const store = `sqlite:///${mkdtempSync(join(tmpdir(), "backstream-js-"))}/jobs.db`;
    // The interrupt policy: the job ends at a stop or a crash, rather than being continued.
    const server = await startServer({ store, args: ["--token", "tok=alice", "--continuation", "backstream/*=interrupt"] });
    /** @type {import("../src/backstream-client.js").Client | undefined} */
    let client;
    try {
      // A stop drains for up to 10 s and a restart takes seconds more on a busy machine: a budget
      // of 240 tries at most 0.5 s apart (two minutes).
      client = await connect(server.url, { token: "tok", WebSocket, reconnectBaseMs: 100, reconnectMaxMs: 500, maxReconnectAttempts: 240 });
      const states = /** @type {string[]} */ ([]);
      client.onStateChange((state) => states.push(state));
      // SIGTERM: clients are closed 1001, running jobs end interrupted with their content kept.
      const first = await client.startJob({ threadId: "t", messageId: "m1", model: "backstream/lorem", messages: LOREM, params: { max_tokens: 1000, tokens_per_s: 50 } });
      const resumed = await collect(client.watch(first.job.job_id), async (_batch, index) => {
        if (index === 2) {
          await server.stop("SIGTERM");
          await server.restart();
        }
      });
      assert.equal(resumed.status, "interrupted");
      assert.ok(contiguous(resumed.batches));
      const info = await client.getJob(first.job.job_id, { includeContent: true });
      assert.equal(resumed.text, info.content);
      assert.equal(info.job.epoch, 1);
      assert.deepEqual(states.slice(0, 2), ["reconnecting", "open"]);

      // SIGKILL: the next start recovers the job at epoch 2. The watch goes on from its epoch-1
      // cursor: at once if the log kept it, else after a rewind batch cutting back to what it kept.
      const second = await client.startJob({ threadId: "t", messageId: "m2", model: "backstream/lorem", messages: LOREM, params: { max_tokens: 1000, tokens_per_s: 50 } });
      const crossed = await collect(client.watch(second.job.job_id), async (_batch, index) => {
        if (index === 3) {
          await server.stop("SIGKILL");
          await server.restart();
        }
      });
      const recovered = await client.getJob(second.job.job_id, { includeContent: true });
      assert.equal(recovered.job.status, "interrupted");
      assert.equal(recovered.job.epoch, 2);
      assert.equal(crossed.status, "interrupted");
      assert.ok(contiguous(crossed.batches));
      assert.equal(crossed.text, recovered.content);
      assert.equal(crossed.batches.at(-1)?.epoch, 2);
      const replay = await collect(client.watch(second.job.job_id));
      assert.equal(replay.text, recovered.content);
      assert.equal(replay.batches[0].epoch, 2);
      // A cursor of an epoch the job never had is plain gone.
      await assert.rejects(
        collect(client.watch(second.job.job_id, { afterSeq: 1, epoch: 3 })),
        (error) => error instanceof GoneError && error.jobId === second.job.job_id && error.validThrough === null,
      );
    } finally {
      await client?.close();
      await server.stop();
    }
  });

  test("an expired session (4401) asks getToken for a fresh token and the watch goes on; a refused one is final", async () => {
    const secret = "s".repeat(40);
    const server = await startServer({ env: { BACKSTREAM_JWT_SECRET: secret } });
    try {
      await refreshesItsToken(server.url, secret);
      await failsOnARefusedRefresh(server.url, secret);
    } finally {
      await server.stop();
    }
  });
});

/**
 * @param {string} url
 * @param {string} secret
 */
async function refreshesItsToken(url, secret) {
  const calls = /** @type {Array<{ refresh: boolean }>} */ ([]);
  const client = await connect(url, {
    WebSocket,
    reconnectBaseMs: 20,
    getToken: (context) => {
      calls.push(context);
      return mintJwt(secret, "alice", 2);
    },
  });
  try {
    assert.equal(client.user, "alice");
    const started = await client.startJob({ threadId: "t", messageId: "jwt", model: "backstream/lorem", messages: LOREM, params: { max_tokens: 160, tokens_per_s: 50 } });
    const { batches, text, status } = await collect(client.watch(started.job.job_id));
    assert.equal(status, "completed");
    assert.ok(contiguous(batches));
    assert.equal(text, (await client.getJob(started.job.job_id, { includeContent: true })).content);
    assert.ok(calls.length >= 2, `getToken was called ${calls.length} times`);
    assert.deepEqual(calls.slice(0, 2), [{ refresh: false }, { refresh: true }]);
    assert.ok(client.statistics().reconnects >= 1);
  } finally {
    await client.close();
  }
}

/**
 * A refreshed token the server refuses is final: the watch fails with UnauthorizedError.
 * @param {string} url
 * @param {string} secret
 */
async function failsOnARefusedRefresh(url, secret) {
  let issued = 0;
  const refused = await connect(url, {
    WebSocket,
    reconnectBaseMs: 20,
    // Two seconds left at least at the hello, whatever the clock's fraction of a second.
    getToken: () => (issued++ === 0 ? mintJwt(secret, "alice", 3) : "not-a-jwt"),
  });
  try {
    const started = await refused.startJob({ threadId: "t", messageId: "jwt2", model: "backstream/lorem", messages: LOREM, params: { max_tokens: 200, tokens_per_s: 50 } });
    await assert.rejects(collect(refused.watch(started.job.job_id)), UnauthorizedError);
    assert.equal(refused.state, "offline");
  } finally {
    await refused.close();
  }
}
