// The client in Node against a real `backstream serve`: every call, typed errors, reconnects.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import {
  BadRequestError,
  CapacityError,
  ConflictError,
  NotFoundError,
  QuotaExceededError,
  RateLimitedError,
  RequestTimeoutError,
  TooLargeError,
  UnauthorizedError,
  UnavailableError,
  batchText,
  connect,
  joinContent,
  workflowSteps,
} from "../src/backstream-client.js";
import { LOREM, REPO, collect, contiguous, sleep, startProxy, startServer } from "./helpers.js";

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
const clients = /** @type {import("../src/backstream-client.js").Client[]} */ ([]);

/**
 * @param {string} token
 * @param {Partial<import("../src/backstream-client.js").ConnectOptions> & { url?: string }} [options]
 */
async function open(token, { url, ...options } = {}) {
  const client = await connect(url ?? server.url, { token, WebSocket, ...options });
  clients.push(client);
  return client;
}

/** @param {import("../src/backstream-client.js").Client} client @param {string} jobId */
async function waitEnded(client, jobId) {
  for (let i = 0; i < 200; i++) {
    const { job } = await client.getJob(jobId);
    if (!["running", "awaiting_approval"].includes(job.status)) return job;
    await sleep(50);
  }
  throw new Error(`${jobId} did not end`);
}

before(async () => {
  server = await startServer({
    args: [
      ...["alice", "bob", "carol", "dave", "erin", "fay"].flatMap((user) => ["--token", `tok-${user}=${user}`]),
      "--tools", "backstream.runtime.tools.demo:DEMO_TOOLS",
      "--max-jobs-per-user", "3",
      "--max-stored-bytes-per-user", "2000000",
      "--ws-deflate", "on",
    ],
  });
});

after(async () => {
  await Promise.all(clients.map((client) => client.close()));
  await server?.stop();
});

describe("requests", () => {
  test("start, watch, get, list: the batches join into the stored content", async () => {
    const client = await open("tok-alice");
    assert.equal(client.user, "alice");
    assert.equal(client.state, "open");
    assert.deepEqual(client.welcome?.features.tools, ["calculate", "clock_now", "send_note"]);
    const started = await client.startJob({
      threadId: "t1", messageId: "m1", model: "backstream/echo",
      messages: [{ role: "user", content: "hello there, how are you today" }],
    });
    assert.equal(started.type, "job.started");
    assert.equal(started.existing, false);
    assert.equal(started.job.thread_id, "t1");
    const { batches, text, status } = await collect(client.watch(started.job.job_id, { afterSeq: 0 }));
    assert.equal(status, "completed");
    assert.ok(contiguous(batches));
    assert.equal(batches[0].type, "job.events");
    const info = await client.getJob(started.job.job_id, { includeContent: true });
    assert.equal(info.type, "job.info");
    assert.equal(text, info.content);
    assert.equal(text, "hello there, how are you today");
    assert.equal(info.job.seq, batches.at(-1)?.to_seq);
    const again = await client.startJob({ threadId: "t1", messageId: "m1", model: "backstream/echo", messages: [{ role: "user", content: "hello" }] });
    assert.equal(again.existing, true);
    assert.equal(again.job.job_id, started.job.job_id);
    const partial = await client.getJob(started.job.job_id, { includeContent: true, offset: 6 });
    assert.equal(partial.content, "there, how are you today");
    const listed = await client.listJobs({ threadId: "t1" });
    assert.deepEqual(listed.jobs.map((job) => job.job_id), [started.job.job_id]);
    assert.deepEqual((await client.listJobs({ threadId: "nope" })).jobs, []);
    assert.equal((await client.ping()).type, "pong");
  });

  test("previousJobId continues a thread: only the new message is sent", async () => {
    const client = await open("tok-alice");
    const first = await client.startJob({ threadId: "chain", messageId: "c1", model: "backstream/echo", messages: [{ role: "user", content: "first" }] });
    await collect(client.watch(first.job.job_id));
    const next = await client.startJob({
      threadId: "chain", messageId: "c2", model: "backstream/echo",
      messages: [{ role: "user", content: "second" }], previousJobId: first.job.job_id,
    });
    assert.equal((await collect(client.watch(next.job.job_id))).text, "second");
    await assert.rejects(
      client.startJob({ threadId: "other", messageId: "c3", model: "backstream/echo", messages: [{ role: "user", content: "x" }], previousJobId: first.job.job_id }),
      (error) => error instanceof BadRequestError && /is of thread 'chain'/.test(error.message),
    );
    await assert.rejects(
      client.startJob({ threadId: "chain", messageId: "c4", model: "backstream/echo", messages: [{ role: "user", content: "x" }], previousJobId: "j_gone" }),
      (error) => error instanceof NotFoundError && error.message === "Previous job with id 'j_gone' not found.",
    );
  });

  test("a watch from a cursor gets exactly the rest", async () => {
    const client = await open("tok-alice");
    const started = await client.startJob({ threadId: "t2", messageId: "m2", model: "backstream/echo", messages: [{ role: "user", content: "one two three four five six" }] });
    const whole = await collect(client.watch(started.job.job_id));
    const cursor = whole.batches[1].to_seq;
    const rest = await collect(client.watch(started.job.job_id, { afterSeq: cursor, epoch: whole.batches[0].epoch }));
    assert.ok(contiguous(rest.batches, cursor));
    const before = whole.batches.filter((b) => b.to_seq <= cursor).map(batchText).join("");
    assert.equal(before + rest.text, whole.text);
  });

  test("a watch the server ends fails alone: the error's job_id names it, other watches go on", async () => {
    const client = await open("tok-erin");
    const params = { max_tokens: 40, tokens_per_s: 100 };
    const ended = await client.startJob({ threadId: "t-end", messageId: "e1", model: "backstream/lorem", messages: LOREM, params });
    const other = await client.startJob({ threadId: "t-end", messageId: "e2", model: "backstream/lorem", messages: LOREM, params });
    // A cursor past where the job will end: the server ends that watch when the job finishes.
    const beyond = collect(client.watch(ended.job.job_id, { afterSeq: 500 }));
    const whole = collect(client.watch(other.job.job_id));
    await assert.rejects(beyond, (error) => error instanceof BadRequestError && /beyond/.test(error.message));
    const { batches, status } = await whole;
    assert.equal(status, "completed");
    assert.ok(contiguous(batches));
    assert.equal(client.state, "open");
  });

  test("abort stops a running job and keeps its content", async () => {
    const client = await open("tok-alice");
    const started = await client.startJob({ threadId: "t3", messageId: "m3", model: "backstream/lorem", messages: LOREM, params: { max_tokens: 2000, tokens_per_s: 100 } });
    const watch = client.watch(started.job.job_id);
    const { text, status } = await collect(watch, async (batch, index) => {
      if (index === 2) {
        const result = await client.abort(started.job.job_id);
        assert.equal(result.type, "job.abort.result");
        assert.equal(result.aborted, true);
      }
    });
    assert.equal(status, "aborted");
    const info = await client.getJob(started.job.job_id, { includeContent: true });
    assert.equal(info.job.status, "aborted");
    assert.equal(info.content, text);
    assert.equal((await client.abort(started.job.job_id)).aborted, false);
  });

  test("tool calls, approve and deny", async () => {
    const client = await open("tok-bob");
    const tools = ["calculate", "clock_now", "send_note"];
    const prompt = [{ role: "user", content: "What is 1337 * 42? Then send a note to Ada." }];
    for (const approved of [true, false]) {
      const started = await client.startJob({ threadId: "tools", messageId: `tools-${approved}`, model: "backstream/tools-demo", messages: prompt, tools, params: { tokens_per_s: 200 } });
      const kinds = /** @type {string[]} */ ([]);
      const { text, status } = await collect(client.watch(started.job.job_id), async (batch) => {
        for (const event of batch.events) {
          kinds.push(event.kind);
          if (event.kind === "approval_required") {
            assert.equal(event.name, "send_note");
            const decided = await client.approve(started.job.job_id, event.call_id, approved);
            assert.equal(decided.type, "job.approve.result");
            await assert.rejects(client.approve(started.job.job_id, event.call_id, approved), ConflictError);
          }
        }
      });
      assert.equal(status, "completed");
      for (const kind of ["tool_call", "approval_required", "approval", "tool_result"]) assert.ok(kinds.includes(kind), kind);
      assert.match(text, /1337 \* 42 = 56154\./);
      const info = await client.getJob(started.job.job_id, { includeContent: true });
      const note = info.tool_calls.find((call) => call.name === "send_note");
      assert.equal(note?.approved, approved);
      assert.equal(note?.is_error, !approved);
      if (!approved) assert.match(text, /You declined send_note/);
    }
  });

  test("a workflow: started by name with its input, its steps folded as they come, its approval decided", async () => {
    const client = await open("tok-bob");
    const started = await client.startJob({ threadId: "flows", messageId: "demo-1", workflow: "demo", input: { expression: "6*7" } });
    assert.equal(started.job.model, "workflow/demo");
    /** @type {import("../src/backstream-client.js").WorkflowStep[]} */
    let steps = [];
    const seen = /** @type {string[]} */ ([]);
    const { text, status } = await collect(client.watch(started.job.job_id), async (batch) => {
      steps = workflowSteps(steps, batch.events);
      for (const step of steps) seen.push(`${step.step}:${step.status}`);
      for (const event of batch.events) {
        if (event.kind === "approval_required") {
          assert.equal(event.name, "approve");
          assert.deepEqual(steps.at(-1), { step: 4, name: "approve", status: "running", summary: "Write the summary of 6*7 = 42?" });
          await client.approve(started.job.job_id, event.call_id, true);
        }
      }
    });
    assert.equal(status, "completed");
    assert.deepEqual(steps.map((s) => [s.step, s.name, s.status]), [
      [1, "model:backstream/echo", "finished"],
      [2, "tool:calculate", "finished"],
      [3, "tool:clock_now", "finished"],
      [4, "approve", "finished"],
      [5, "model:backstream/echo", "finished"],
    ]);
    assert.equal(steps[1].summary, "42");
    assert.match(text, /^Plan: compute 6\*7, read the clock, ask, summarize\.\n\n6\*7 = 42\n\n/);
    const info = await client.getJob(started.job.job_id, { includeContent: true });
    assert.deepEqual(info.step, { step: 5, name: "model:backstream/echo", status: "finished", summary: steps[4].summary });
    await assert.rejects(client.startJob({ threadId: "flows", messageId: "demo-2", workflow: "nope" }), /unknown workflow 'nope' \(known: demo\)/);
  });

  test("notifications: pushed when nobody watches, listed, read; none for a muted thread", async () => {
    const client = await open("tok-carol");
    const pushed = /** @type {import("../src/backstream-client.js").Notification[]} */ ([]);
    const stop = client.onNotification((n) => pushed.push(n));
    const muted = await client.muteThread("quiet", true);
    assert.deepEqual([muted.type, muted.thread_id, muted.muted], ["thread.mute.result", "quiet", true]);
    const loud = await client.startJob({ threadId: "loud", messageId: "n1", model: "backstream/echo", messages: [{ role: "user", content: "ping me when done" }] });
    const quiet = await client.startJob({ threadId: "quiet", messageId: "n2", model: "backstream/echo", messages: [{ role: "user", content: "do not ping me" }] });
    await waitEnded(client, loud.job.job_id);
    await waitEnded(client, quiet.job.job_id);
    for (let i = 0; i < 40 && pushed.length === 0; i++) await sleep(50);
    await sleep(200); // a push for the muted thread would have come by now
    stop();
    assert.deepEqual(pushed.map((n) => [n.type, n.job_id, n.thread_id]), [["ai.message.received", loud.job.job_id, "loud"]]);
    assert.equal(pushed[0].body, "ping me when done");
    const listed = await client.listNotifications();
    assert.equal(listed.type, "notifications.result");
    assert.deepEqual(listed.notifications.map((n) => n.job_id), [loud.job.job_id]);
    assert.equal(listed.unread, 1);
    assert.equal((await client.listNotifications({ unreadOnly: true })).notifications.length, 1);
    const read = await client.markNotificationsRead({ ids: [listed.notifications[0].notification_id] });
    assert.deepEqual([read.type, read.unread], ["notifications.read.result", 0]);
    assert.equal((await client.markNotificationsRead({ all: true })).unread, 0);
  });
});

test("the clients guide's example runs as written (on this test's server and token)", async () => {
  const readme = readFileSync(join(REPO, "docs", "clients.md"), "utf8");
  const example = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]).find((code) => code.includes("connect("));
  assert.ok(example);
  // Inside the package, so that "backstream-client" resolves to it; Node 20 has no global WebSocket.
  const file = join(REPO, "clients", "js", "test", `.readme-example-${process.pid}.mjs`);
  const script = example.replace("ws://127.0.0.1:8765/v1", server.url).replace('"tokA"', '"tok-dave"');
  writeFileSync(file, `import { WebSocket } from "ws";\nglobalThis.WebSocket = WebSocket;\n${script}`);
  try {
    const { stdout } = await promisify(execFile)(process.execPath, [file], { timeout: 20_000 });
    assert.equal(stdout.trim(), 'completed "hello" true');
  } finally {
    rmSync(file, { force: true });
  }
});

describe("permessage-deflate", () => {
  /**
   * A `ws` WebSocket class with these `ws` options that records each handshake's agreed extensions.
   * @param {import("ws").ClientOptions} options
   */
  function recording(options) {
    const sockets = /** @type {{ extensions: string, agreed: string }[]} */ ([]);
    class Recording extends WebSocket {
      /** @param {string} url */
      constructor(url) {
        super(url, options);
        const record = { extensions: "", agreed: "" };
        sockets.push(record);
        this.on("upgrade", (response) => {
          record.agreed = String(response.headers["sec-websocket-extensions"] ?? "");
        });
        this.on("open", () => {
          record.extensions = this.extensions;
        });
      }
    }
    return { sockets, WebSocket: /** @type {any} */ (Recording) };
  }

  for (const offered of [true, false]) {
    test(`a client that ${offered ? "offers" : "does not offer"} it gets the whole stream ${offered ? "compressed" : "in plain frames"}`, async () => {
      const { sockets, WebSocket: Socket } = recording({ perMessageDeflate: offered });
      const client = await open("tok-erin", { WebSocket: Socket });
      const started = await client.startJob({
        threadId: `deflate-${offered}`, messageId: "m1", model: "backstream/lorem",
        messages: LOREM, params: { max_tokens: 400, tokens_per_s: 2000 },
      });
      const { batches, text, status } = await collect(client.watch(started.job.job_id, { afterSeq: 0 }));
      assert.equal(status, "completed");
      assert.ok(contiguous(batches));
      const info = await client.getJob(started.job.job_id, { includeContent: true });
      assert.equal(text, info.content);
      assert.ok(text.split(" ").length > 300);
      assert.equal(sockets.length, 1);
      // The extension the handshake agreed on: the server's bounded window, one inflater per message.
      if (offered) {
        assert.equal(sockets[0].extensions, "permessage-deflate");
        assert.equal(sockets[0].agreed, "permessage-deflate; client_no_context_takeover; client_max_window_bits=10");
      } else {
        assert.deepEqual(sockets[0], { extensions: "", agreed: "" });
      }
      await client.close();
    });
  }
});

describe("typed errors", () => {
  test("per protocol code", async () => {
    const client = await open("tok-dave");
    await assert.rejects(client.getJob("j_nope"), (error) => error instanceof NotFoundError && error.code === "not_found");
    await assert.rejects(
      client.startJob({ threadId: "t", messageId: "bad", model: "backstream/nope", messages: LOREM }),
      (error) => error instanceof BadRequestError && /unknown built-in model/.test(error.message),
    );
    await assert.rejects(client.markNotificationsRead({}), BadRequestError);
    const huge = [{ role: "user", content: "é".repeat(600_000) }]; // 1.2 MB of UTF-8, over the 1 MiB frame limit
    await assert.rejects(client.startJob({ threadId: "t", messageId: "huge", model: "backstream/echo", messages: huge }), TooLargeError);
    assert.equal(client.state, "open");
    assert.equal(client.statistics().reconnects, 0);
    const watch = client.watch("j_nope");
    await assert.rejects(watch.next(), NotFoundError);
    const alice = await open("tok-alice");
    const theirs = await alice.startJob({ threadId: "private", messageId: "p1", model: "backstream/echo", messages: LOREM });
    await assert.rejects(client.getJob(theirs.job.job_id), (error) => error instanceof NotFoundError && error.message === "no such job");
    const running = [];
    for (let i = 0; i < 3; i++) {
      running.push(await client.startJob({ threadId: "cap", messageId: `cap${i}`, model: "backstream/lorem", messages: LOREM, params: { max_tokens: 5000 } }));
    }
    await assert.rejects(
      client.startJob({ threadId: "cap", messageId: "cap3", model: "backstream/lorem", messages: LOREM }),
      (error) => error instanceof CapacityError && typeof error.retryAfterMs === "number" && error.retryAfterMs > 0,
    );
    for (const started of running) await client.abort(started.job.job_id);
  });

  test("a start past the user's quota of stored bytes fails with QuotaExceededError", async () => {
    const client = await open("tok-fay");
    const big = [{ role: "user", content: "x".repeat(900_000) }]; // 0.9 MB a request; the quota is 2 MB
    const start = (messageId) =>
      client.startJob({ threadId: "q", messageId, model: "backstream/lorem", messages: big, params: { max_tokens: 5 } });
    await start("q1");
    await start("q2");
    await assert.rejects(
      start("q3"),
      (error) => error instanceof QuotaExceededError && error.code === "quota_exceeded" && /quota of 2000000 bytes/.test(error.message),
    );
    assert.equal((await start("q1")).existing, true); // a repeat is never refused
  });

  test("a bad token fails connect with UnauthorizedError", async () => {
    await assert.rejects(connect(server.url, { token: "wrong", WebSocket }), UnauthorizedError);
    await assert.rejects(connect("http://127.0.0.1/v1", { token: "x", WebSocket }), TypeError);
  });
});

describe("reconnects", () => {
  test("a watch resumes after the network drops: no gap, no repeat", async () => {
    const proxy = await startProxy(server.port);
    /** @type {import("../src/backstream-client.js").Client | undefined} */
    let client;
    try {
      client = await open("tok-erin", { url: proxy.url, reconnectBaseMs: 50 });
      const started = await client.startJob({ threadId: "drop", messageId: "d1", model: "backstream/lorem", messages: LOREM, params: { max_tokens: 120, tokens_per_s: 60 } });
      const watch = client.watch(started.job.job_id);
      const { batches, text, status } = await collect(watch, (_batch, index) => {
        if (index === 2 || index === 6) proxy.cut();
      });
      assert.equal(status, "completed");
      assert.ok(contiguous(batches), JSON.stringify(batches.map((b) => [b.from_seq, b.to_seq])));
      assert.equal(text, (await client.getJob(started.job.job_id, { includeContent: true })).content);
      assert.equal(client.statistics().reconnects, 2);
      assert.equal(watch.subscriptions, 3);
      assert.equal(proxy.state.accepted, 3);
    } finally {
      await client?.close(); // before the proxy: no client of one test reconnects into the next
      await proxy.close();
    }
  });

  test("a slow consumer is held to watchBufferSize batches and still gets everything", async () => {
    const client = await open("tok-erin", { watchBufferSize: 2 });
    const started = await client.startJob({ threadId: "slow", messageId: "s1", model: "backstream/lorem", messages: LOREM, params: { max_tokens: 400, tokens_per_s: 800 } });
    const watch = client.watch(started.job.job_id);
    await waitEnded(client, started.job.job_id); // batches came while nobody read them
    let most = watch.buffered;
    const { batches, text, status } = await collect(watch, () => {
      most = Math.max(most, watch.buffered);
    });
    assert.equal(status, "completed");
    assert.ok(contiguous(batches));
    assert.ok(most <= 2, `buffered ${most}`);
    assert.ok(watch.subscriptions > 1, "the full buffer unsubscribed, and subscribed again once read");
    assert.equal(text, (await client.getJob(started.job.job_id, { includeContent: true })).content);
  });

  test("requests time out, and a bounded number waits for a connection", async () => {
    const proxy = await startProxy(server.port);
    /** @type {import("../src/backstream-client.js").Client | undefined} */
    let client;
    try {
      client = await open("tok-erin", { url: proxy.url, requestTimeoutMs: 1500, maxPendingRequests: 2, reconnectBaseMs: 20, reconnectMaxMs: 50 });
      proxy.state.blackhole = true;
      await assert.rejects(client.ping(), RequestTimeoutError);
      proxy.state.blackhole = false;
      proxy.state.refuse = true;
      proxy.cut();
      await sleep(30);
      assert.equal(client.state, "reconnecting");
      const waiting = [client.ping(), client.ping()];
      await assert.rejects(client.ping(), (error) => error instanceof UnavailableError && /wait for a reply or a connection/.test(error.message));
      proxy.state.refuse = false;
      const pongs = await Promise.all(waiting);
      assert.deepEqual(pongs.map((p) => p.type), ["pong", "pong"]);
      assert.equal(client.state, "open");
    } finally {
      await client?.close(); // before the proxy: no client of one test reconnects into the next
      await proxy.close();
    }
  });

  test("past the user's connection cap: a first connect rejects, a reconnect backs off until a seat frees", async () => {
    const capped = await startServer({ args: ["--token", "tok-fay=fay", "--max-connections-per-user", "1"] });
    const proxy = await startProxy(capped.port);
    const options = { token: "tok-fay", WebSocket, reconnectBaseMs: 50, reconnectMaxMs: 200, maxReconnectAttempts: 1000 };
    /** @type {import("../src/backstream-client.js").Client[]} */
    const opened = [];
    try {
      const first = await connect(proxy.url, options);
      opened.push(first);
      await assert.rejects(
        connect(capped.url, options),
        (error) => error instanceof RateLimitedError && /at most 1 connections/.test(error.message),
      );
      proxy.state.refuse = true;
      proxy.cut(); // the first client's connection drops; the server lets go of its seat...
      let other = null;
      for (let i = 0; other === null && i < 100; i++) {
        other = await connect(capped.url, options).catch(() => sleep(50).then(() => null));
      }
      assert.ok(other, "the seat did not come free");
      opened.push(other); // ...and another client takes it
      proxy.state.refuse = false;
      const attemptsBefore = proxy.state.accepted;
      await sleep(1000);
      assert.equal(first.state, "reconnecting"); // refused 4409, and still trying
      const attempts = proxy.state.accepted - attemptsBefore;
      assert.ok(attempts >= 2 && attempts <= 40, `${attempts} attempts in 1 s: backed off, not a tight loop`);
      await other.close();
      for (let i = 0; first.state !== "open" && i < 100; i++) await sleep(50);
      assert.equal(first.state, "open");
      await first.ping();
      assert.equal(first.statistics().reconnects, 1);
    } finally {
      await Promise.all(opened.map((client) => client.close()));
      await proxy.close();
      await capped.stop();
    }
  });

  test("after maxReconnectAttempts the client is offline; watches fail, the next call retries", async () => {
    const proxy = await startProxy(server.port);
    /** @type {import("../src/backstream-client.js").Client | undefined} */
    let client;
    try {
      client = await open("tok-erin", { url: proxy.url, maxReconnectAttempts: 2, reconnectBaseMs: 10, reconnectMaxMs: 20 });
      const started = await client.startJob({ threadId: "off", messageId: "o1", model: "backstream/lorem", messages: LOREM, params: { max_tokens: 60, tokens_per_s: 30 } });
      const watch = client.watch(started.job.job_id);
      await watch.next();
      proxy.state.refuse = true;
      proxy.cut();
      await assert.rejects(collect(watch), (error) => error instanceof UnavailableError && /after 3 attempts/.test(error.message));
      assert.equal(client.state, "offline");
      proxy.state.refuse = false;
      const rest = await collect(client.watch(started.job.job_id, { afterSeq: watch.cursor, epoch: watch.epoch }));
      assert.ok(contiguous(rest.batches, watch.cursor));
      assert.equal(client.state, "open");
    } finally {
      await client?.close(); // before the proxy: no client of one test reconnects into the next
      await proxy.close();
    }
  });
});

test("workflowSteps folds step events into a list, a step updated in place when it finishes", () => {
  const step = (seq, n, phase, summary, is_error = false) => ({ seq, kind: "step", step: n, name: `s${n}`, phase, summary, data: null, is_error });
  const first = workflowSteps([], [step(2, 1, "started", "asked"), { seq: 3, kind: "text", text: "x" }]);
  assert.deepEqual(first, [{ step: 1, name: "s1", status: "running", summary: "asked" }]);
  const later = workflowSteps(first, [step(4, 1, "finished", "done"), step(5, 2, "started", ""), step(6, 2, "finished", "boom", true)]);
  assert.deepEqual(later.map((s) => [s.step, s.status, s.summary]), [[1, "finished", "done"], [2, "failed", "boom"]]);
  assert.equal(first[0].status, "running"); // the list given is not changed
  assert.equal(workflowSteps(later, [{ seq: 7, kind: "text", text: "y" }]), later);
});

test("joinContent applies a rewind: the withdrawn text goes, the new text follows", () => {
  const batch = (from_seq, events) => ({ type: "job.events", job_id: "j", epoch: 2, from_seq, to_seq: from_seq + events.length - 1, events });
  let content = joinContent("", batch(1, [{ seq: 1, kind: "status", status: "running", error: null, finish_reason: null, usage: null }, { seq: 2, kind: "text", text: "Hello, " }]));
  content = joinContent(content, batch(3, [{ seq: 3, kind: "text", text: "wor" }]));
  assert.equal(content, "Hello, wor");
  content = joinContent(content, batch(4, [{ seq: 4, kind: "rewind", to_seq: 1, content_length: 0 }, { seq: 5, kind: "text", text: "Hi there" }]));
  assert.equal(content, "Hi there");
});
