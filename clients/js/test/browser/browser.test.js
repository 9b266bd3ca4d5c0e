// The client and the demo chat page in real headless Chromium, against a real server.

import assert from "node:assert/strict";
import http from "node:http";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { connect } from "../../src/backstream-client.js";
import { sleep, startProxy, startServer } from "../helpers.js";
import { launch, openPage, screenshot } from "./chromium.js";

const USERS = ["client", "switch", "notify", "reload", "network", "muted", "failed", "tools", "stop", "workflow"];
const WORDS = (/** @type {number} */ n) => Array.from({ length: n }, (_, i) => `word${i + 1}`).join(" ");

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
/** @type {import("playwright-core").Browser} */
let browser;
/** @type {http.Server} */
let upstream;
const closers = /** @type {Array<() => Promise<unknown>>} */ ([]);

/** Streams of the fake upstream waiting for `failUpstream()`. */
const held = /** @type {http.ServerResponse[]} */ ([]);

/**
 * An OpenAI-style upstream with one model, `acme/slow-fail`: it streams a few words, then
 * holds the stream until the test calls `failUpstream()`, which ends it with an error.
 * @returns {Promise<number>}
 */
function startFailingUpstream() {
  upstream = http.createServer((request, response) => {
    if (request.method === "GET" && request.url === "/v1/models") {
      response.writeHead(200, { "content-type": "application/json" });
      response.end(JSON.stringify({ object: "list", data: [{ id: "acme/slow-fail", object: "model" }] }));
      return;
    }
    request.resume();
    response.writeHead(200, { "content-type": "text/event-stream" });
    response.write(`data: ${JSON.stringify({ choices: [{ index: 0, delta: { content: "Let me think about that" } }] })}\n\n`);
    held.push(response);
  });
  return new Promise((resolve) => upstream.listen(0, "127.0.0.1", () => resolve(/** @type {import("node:net").AddressInfo} */ (upstream.address()).port)));
}

function failUpstream() {
  for (const response of held.splice(0)) response.end(`data: ${JSON.stringify({ error: { message: "the model crashed" } })}\n\n`);
}

/** The server's view, through the Node client, as the same user. */
async function serverClient(/** @type {string} */ user) {
  const client = await connect(server.url, { token: `tok-${user}`, WebSocket });
  closers.push(() => client.close());
  return client;
}

before(async () => {
  const upstreamPort = await startFailingUpstream();
  server = await startServer({
    web: true,
    args: [
      ...USERS.flatMap((user) => ["--token", `tok-${user}=${user}`]),
      "--tools", "backstream.runtime.tools.demo:DEMO_TOOLS",
      "--upstream-url", `http://127.0.0.1:${upstreamPort}/v1`,
      "--ws-deflate", "on",
    ],
  });
  browser = await launch();
});

after(async () => {
  for (const close of closers) await close();
  await browser?.close();
  await server?.stop();
  failUpstream();
  upstream?.close();
});

// Each test has its own user and browser context, so they run side by side.
describe("in Chromium", { concurrency: 3 }, () => {
  test("the client in Chromium (permessage-deflate): start, watch, drop the socket mid-answer, resume, compare with job.get", async () => {
    const proxy = await startProxy(server.port);
    closers.push(() => proxy.close());
    const { page, problems, context } = await openPage(browser);
    await page.route("**/favicon.ico", (route) => route.fulfill({ status: 204 })); // a page with no icon
    await page.goto(`${server.http}/healthz`);
    await page.exposeFunction("dropNetwork", () => proxy.cut());
    const result = await page.evaluate(async (url) => {
      const { connect, batchText } = await import("/client/backstream-client.js");
      const sockets = /** @type {WebSocket[]} */ ([]);
      // Chromium always offers permessage-deflate; each socket says what the server agreed to.
      class Recording extends WebSocket {
        /** @param {string} address */
        constructor(address) {
          super(address);
          sockets.push(this);
        }
      }
      const client = await connect(url, { token: "tok-client", reconnectBaseMs: 50, WebSocket: Recording });
      const started = await client.startJob({
        threadId: "browser", messageId: "b1", model: "backstream/lorem",
        messages: [{ role: "user", content: "Tell me something long." }], params: { max_tokens: 120, tokens_per_s: 60 },
      });
      const batches = [];
      for await (const batch of client.watch(started.job.job_id, { afterSeq: 0 })) {
        batches.push({ from: batch.from_seq, to: batch.to_seq, text: batchText(batch) });
        if (batches.length === 3) await /** @type {any} */ (window).dropNetwork();
      }
      const info = await client.getJob(started.job.job_id, { includeContent: true });
      const { reconnects } = client.statistics();
      await client.close();
      return { batches, content: info.content, status: info.job.status, reconnects, extensions: sockets.map((s) => s.extensions) };
    }, proxy.url);
    assert.deepEqual(result.extensions, Array(2).fill("permessage-deflate; client_no_context_takeover; client_max_window_bits=10"));
    assert.equal(result.status, "completed");
    assert.equal(result.reconnects, 1);
    assert.equal(proxy.state.accepted, 2);
    let next = 1;
    for (const batch of result.batches) {
      assert.equal(batch.from, next, "each batch starts right after the one before");
      next = batch.to + 1;
    }
    assert.equal(result.batches.map((b) => b.text).join(""), result.content);
    assert.deepEqual(problems, []);
    await context.close();
  });

  /**
   * The page of a fresh browser profile, signed in through the URL fragment.
   * @param {string} user
   */
  async function chat(user) {
    const opened = await openPage(browser);
    closers.push(() => opened.context.close());
    await opened.page.goto(`${server.http}/#token=tok-${user}`);
    await opened.page.waitForSelector("#connection[data-state=open]");
    assert.equal(new URL(opened.page.url()).hash, "", "the token leaves the address bar");
    return opened;
  }

  /**
   * Type a message and send it; resolves with the job id of its answer.
   * @param {import("playwright-core").Page} page
   * @param {string} text
   * @param {string} model
   */
  async function send(page, text, model) {
    const before = await page.locator("article[data-job-id]").count();
    await page.selectOption("#model", model);
    await page.fill("#prompt", text);
    await page.press("#prompt", "Enter");
    const answer = page.locator("article[data-job-id]").nth(before);
    await answer.waitFor();
    return /** @type {string} */ (await answer.getAttribute("data-job-id"));
  }

  /** @param {import("playwright-core").Page} page @param {string} jobId @param {number} seq */
  const seqAtLeast = (page, jobId, seq) =>
    page.waitForFunction(([id, min]) => Number(document.querySelector(`article[data-job-id="${id}"]`)?.getAttribute("data-seq")) >= Number(min), [jobId, seq]);

  /** @param {import("playwright-core").Page} page @param {string} jobId @param {string} status */
  const statusIs = (page, jobId, status) => page.waitForSelector(`article[data-job-id="${jobId}"][data-status="${status}"]`);

  /** Text with each run of white space as one space (Markdown keeps words, not spacing). */
  const flat = (/** @type {string | null | undefined} */ text) => (text ?? "").replace(/\s+/g, " ").trim();

  /** The answer's words as the page shows them (its Markdown rendered). */
  const shown = async (/** @type {import("playwright-core").Page} */ page, /** @type {string} */ jobId) =>
    flat(await page.$$eval(`article[data-job-id="${jobId}"] .part-text`, (parts) => parts.map((p) => p.textContent).join(" ")));

  /** @param {any[]} sent @param {string} jobId */
  const watchesOf = (sent, jobId) => sent.filter((m) => m.type === "job.watch" && m.job_id === jobId);

  test("loads with no console errors and offers the built-in and upstream models", async () => {
    const { page, problems } = await chat("client");
    const models = await page.$$eval("#model option", (options) => options.map((o) => /** @type {HTMLOptionElement} */ (o).value));
    assert.deepEqual(models, ["backstream/echo", "backstream/lorem", "backstream/tools-demo", "workflow/demo", "acme/slow-fail"]);
    await page.waitForSelector(".suggestion");
    await screenshot(page, "demo-empty");
    assert.deepEqual(problems, []);
  });

  /**
   * Wait until the server's log of the job is `ahead` entries past `seq`.
   * @param {import("../../src/backstream-client.js").Client} admin @param {string} jobId @param {number} seq @param {number} ahead
   */
  async function serverPast(admin, jobId, seq, ahead) {
    for (;;) {
      const { job } = await admin.getJob(jobId);
      if (job.seq >= seq + ahead) return job;
      assert.equal(job.status, "running");
      await sleep(50);
    }
  }

  /** @param {import("playwright-core").Page} page @param {string} jobId */
  const seqOf = async (page, jobId) => Number(await page.getAttribute(`article[data-job-id="${jobId}"]`, "data-seq"));

  test("switch threads mid-answer: the job goes on; back before it ends, it resumes live with no gap or repeat", async () => {
    const { page, problems, sent } = await chat("switch");
    const admin = await serverClient("switch");
    const jobId = await send(page, WORDS(400), "backstream/echo");
    const threadA = await page.getAttribute(".thread-item.active", "data-thread-id");
    await seqAtLeast(page, jobId, 6);
    await page.click("#new-thread");
    await page.waitForFunction(() => !document.querySelector("article[data-job-id]"));
    const away = await serverPast(admin, jobId, 6, 15);
    assert.ok(sent.some((m) => m.type === "job.unwatch" && m.job_id === jobId), "leaving the thread unwatches");
    await page.click(`.thread-item[data-thread-id="${threadA}"]`);
    await page.waitForSelector(`article[data-job-id="${jobId}"][data-status=running]`);
    const resumedAfter = watchesOf(sent, jobId).at(-1).after_seq;
    assert.ok(resumedAfter >= 6 && resumedAfter < away.seq, `resumed after seq ${resumedAfter}`);
    await seqAtLeast(page, jobId, away.seq + 5); // live again
    await screenshot(page, "demo-resumed");
    await admin.abort(jobId);
    await statusIs(page, jobId, "aborted");
    const info = await admin.getJob(jobId, { includeContent: true });
    assert.equal(await shown(page, jobId), flat(info.content));
    assert.ok(WORDS(400).startsWith(info.content ?? "-") && (info.content ?? "").length > 100);
    assert.deepEqual(problems, []);
  });

  test("an answer that ends in a thread not open raises a toast and an unread count; back, it is all there", async () => {
    const { page, problems } = await chat("notify");
    const admin = await serverClient("notify");
    // The job waits for an approval, so it cannot end before the thread is left.
    const jobId = await send(page, "Please send a note to Ada.", "backstream/tools-demo");
    const threadA = await page.getAttribute(".thread-item.active", "data-thread-id");
    const callId = await page.getAttribute(`article[data-job-id="${jobId}"] .tool-pending`, "data-call-id");
    await page.click("#new-thread");
    await admin.approve(jobId, /** @type {string} */ (callId), true);
    const toast = await page.waitForSelector('.toast[data-type="ai.message.received"]');
    assert.match(await toast.innerText(), /Response ready/);
    assert.match(await toast.innerText(), /send_note/);
    // One for the answer; on a loaded machine the approval may have been asked before the
    // page's watch was recorded, and then it notified too: the page shows what the server has.
    const { unread } = await admin.listNotifications();
    assert.ok(unread === 1 || unread === 2, `${unread} unread`);
    assert.equal(await page.textContent("#unread-count"), String(unread));
    assert.equal(await page.textContent(`.thread-item[data-thread-id="${threadA}"] .thread-badge`), String(unread));
    await screenshot(page, "demo-notification");
    await page.click(`.thread-item[data-thread-id="${threadA}"]`);
    await statusIs(page, jobId, "completed");
    const info = await admin.getJob(jobId, { includeContent: true });
    assert.equal(await shown(page, jobId), flat(info.content));
    await page.waitForSelector("#unread-count[hidden]", { state: "attached" });
    assert.equal((await admin.listNotifications()).unread, 0);
    assert.deepEqual(problems, []);
  });

  test("reload mid-answer: it resumes from the seq it kept, with no duplicated text", async () => {
    const { page, problems, sent } = await chat("reload");
    const admin = await serverClient("reload");
    const jobId = await send(page, WORDS(400), "backstream/echo");
    await seqAtLeast(page, jobId, 8);
    await screenshot(page, "demo-streaming");
    sent.length = 0;
    await page.reload();
    await page.waitForSelector(`article[data-job-id="${jobId}"][data-status=running]`);
    const first = watchesOf(sent, jobId)[0];
    assert.ok(first.after_seq >= 8, `after the reload the watch resumed after seq ${first.after_seq}`);
    await seqAtLeast(page, jobId, first.after_seq + 5); // live again
    await admin.abort(jobId);
    await statusIs(page, jobId, "aborted");
    const info = await admin.getJob(jobId, { includeContent: true });
    assert.equal(await shown(page, jobId), flat(info.content));
    assert.ok(WORDS(400).startsWith(info.content ?? "-"));
    assert.deepEqual(problems, []);
  });

  test("the network drops mid-answer: the page says so, reconnects and resumes with no duplicated text", async () => {
    const proxy = await startProxy(server.port);
    closers.push(() => proxy.close());
    const opened = await openPage(browser);
    closers.push(() => opened.context.close());
    const { page, problems, sent } = opened;
    await page.goto(`${server.http}/?ws=${encodeURIComponent(proxy.url)}#token=tok-network`);
    await page.waitForSelector("#connection[data-state=open]");
    const admin = await serverClient("network");
    const jobId = await send(page, WORDS(400), "backstream/echo");
    await seqAtLeast(page, jobId, 6);
    proxy.state.refuse = true;
    proxy.cut();
    await page.waitForSelector("#connection[data-state=reconnecting]");
    assert.equal(await page.textContent(`article[data-job-id="${jobId}"] .chip`), "Reconnecting");
    await screenshot(page, "demo-reconnecting");
    const before = await seqOf(page, jobId);
    proxy.state.refuse = false;
    await page.waitForSelector("#connection[data-state=open]");
    await seqAtLeast(page, jobId, before + 5);
    const resumed = watchesOf(sent, jobId).at(-1);
    assert.equal(resumed.after_seq, before, "the watch resumed right after what the page showed");
    await admin.abort(jobId);
    await statusIs(page, jobId, "aborted");
    const info = await admin.getJob(jobId, { includeContent: true });
    assert.equal(await shown(page, jobId), flat(info.content));
    // Chromium itself logs each refused reconnect; the page logs nothing.
    const refused = `error: WebSocket connection to '${proxy.url}' failed:`;
    assert.deepEqual(problems.filter((line) => !line.startsWith(refused)), []);
  });

  test("a muted thread raises no notification", async () => {
    const { page, problems } = await chat("muted");
    const admin = await serverClient("muted");
    await page.click("#mute");
    await page.waitForSelector("#mute[aria-pressed=true]");
    const jobId = await send(page, "Please send a note to Ada.", "backstream/tools-demo");
    const callId = await page.getAttribute(`article[data-job-id="${jobId}"] .tool-pending`, "data-call-id");
    await page.click("#new-thread");
    await admin.approve(jobId, /** @type {string} */ (callId), true);
    while ((await admin.getJob(jobId)).job.status === "running") await sleep(50);
    await sleep(300); // a notification would have been pushed by now
    assert.equal(await page.locator(".toast").count(), 0);
    assert.equal(await page.isHidden("#unread-count"), true);
    assert.deepEqual((await admin.listNotifications()).notifications, []);
    assert.deepEqual(problems, []);
  });

  test("a failed answer in a thread not open raises a warning", async () => {
    const { page, problems } = await chat("failed");
    const jobId = await send(page, "Will this work?", "acme/slow-fail");
    await seqAtLeast(page, jobId, 2);
    const threadA = await page.getAttribute(".thread-item.active", "data-thread-id");
    await page.click("#new-thread");
    failUpstream();
    const toast = await page.waitForSelector('.toast.toast-warning[data-type="system.warning"]');
    assert.match(await toast.innerText(), /the model crashed/);
    await screenshot(page, "demo-warning");
    await page.click(`.thread-item[data-thread-id="${threadA}"]`);
    await statusIs(page, jobId, "failed");
    assert.match(await page.innerText(`article[data-job-id="${jobId}"] .note.error`), /the model crashed/);
    assert.deepEqual(problems, []);
  });

  test("tool calls are shown inline, with an approve/deny prompt", async () => {
    const { page, problems } = await chat("tools");
    const admin = await serverClient("tools");
    const jobId = await send(page, "What is 6 * 7? Then send a note to Ada.", "backstream/tools-demo");
    await page.waitForSelector(`article[data-job-id="${jobId}"] .tool-pending [data-action=approve]`);
    assert.equal(await page.textContent(`article[data-job-id="${jobId}"] .chip`), "Waiting for you");
    await screenshot(page, "demo-approval");
    await page.click(`article[data-job-id="${jobId}"] [data-action=approve]`);
    await statusIs(page, jobId, "completed");
    assert.equal(await page.textContent(`article[data-job-id="${jobId}"] .tool[data-tool=calculate] .tool-output`), "42");
    assert.equal(await page.textContent(`article[data-job-id="${jobId}"] .tool[data-tool=send_note] .decision`), "Approved");
    const info = await admin.getJob(jobId, { includeContent: true });
    assert.match(info.content ?? "", /6 \* 7 = 42\./);
    assert.equal(await shown(page, jobId), flat(info.content));
    assert.equal(info.tool_calls.find((call) => call.name === "send_note")?.approved, true);
    await screenshot(page, "demo-tools");
    assert.deepEqual(problems, []);
  });

  test("a workflow's steps are listed under its answer, its approval asked inline", async () => {
    const { page, problems } = await chat("workflow");
    const admin = await serverClient("workflow");
    const jobId = await send(page, "Compute 6*7 and tell me the time.", "workflow/demo");
    const answer = `article[data-job-id="${jobId}"]`;
    await page.waitForSelector(`${answer} .tool-pending[data-tool=approve] [data-action=approve]`);
    const waiting = await page.$$eval(`${answer} .steps .step`, (items) => items.map((li) => [li.getAttribute("data-step"), li.getAttribute("data-status")]));
    assert.deepEqual(waiting, [["1", "finished"], ["2", "finished"], ["3", "finished"], ["4", "running"]]);
    await screenshot(page, "demo-workflow-approval");
    await page.click(`${answer} [data-action=approve]`);
    await statusIs(page, jobId, "completed");
    const steps = await page.$$eval(`${answer} .steps .step`, (items) =>
      items.map((li) => [li.querySelector(".step-name")?.textContent, li.getAttribute("data-status"), li.querySelector(".step-summary")?.textContent]));
    assert.deepEqual(steps.map(([name, status]) => [name, status]), [
      ["model:backstream/echo", "finished"],
      ["tool:calculate", "finished"],
      ["tool:clock_now", "finished"],
      ["approve", "finished"],
      ["model:backstream/echo", "finished"],
    ]);
    assert.equal(steps[1][2], "42");
    assert.equal(steps[3][2], "approved");
    const info = await admin.getJob(jobId, { includeContent: true });
    assert.equal(await shown(page, jobId), flat(info.content));
    await screenshot(page, "demo-workflow");
    await page.reload();  // a finished workflow replayed from the server shows the same steps
    await statusIs(page, jobId, "completed");
    assert.equal(await page.locator(`${answer} .steps .step-finished`).count(), 5);
    assert.deepEqual(problems, []);
  });

  test("stop aborts the answer and keeps what was said", async () => {
    const { page, problems } = await chat("stop");
    const admin = await serverClient("stop");
    const jobId = await send(page, "Tell me something long.", "backstream/lorem");
    await seqAtLeast(page, jobId, 4);
    await page.click("#stop");
    await statusIs(page, jobId, "aborted");
    const info = await admin.getJob(jobId, { includeContent: true });
    assert.equal(info.job.status, "aborted");
    assert.equal(await shown(page, jobId), flat(info.content));
    await page.waitForSelector("#send:not([hidden])");
    assert.deepEqual(problems, []);
  });
});
