// The demo chat page at phone and desktop sizes, its Markdown answers (hostile ones too), where
// its toasts go, and the model it keeps per thread: in real headless Chromium, against a real server.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { connect } from "../../src/backstream-client.js";
import { sleep, startServer } from "../helpers.js";
import { launch, openPage, screenshot } from "./chromium.js";

const USERS = ["phone", "markdown", "streaming", "toast-desktop", "toast-phone", "models"];
const PHONE = { width: 390, height: 844 };
const DESKTOP = { width: 1280, height: 800 };

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
/** @type {import("playwright-core").Browser} */
let browser;
const closers = /** @type {Array<() => Promise<unknown>>} */ ([]);

before(async () => {
  server = await startServer({
    web: true,
    args: [...USERS.flatMap((user) => ["--token", `tok-${user}=${user}`]), "--tools", "backstream.runtime.tools.demo:DEMO_TOOLS"],
  });
  browser = await launch();
});

after(async () => {
  for (const close of closers) await close();
  await browser?.close();
  await server?.stop();
});

/**
 * The page of a fresh browser profile at `size`, signed in through the URL fragment.
 * @param {string} user
 * @param {{ width: number, height: number }} size
 */
async function chat(user, size) {
  const opened = await openPage(browser);
  closers.push(() => opened.context.close());
  await opened.page.setViewportSize(size);
  await opened.page.goto(`${server.http}/#token=tok-${user}`);
  await opened.page.waitForSelector("#connection[data-state=open]");
  return opened;
}

/** @param {string} user */
async function serverClient(user) {
  const client = await connect(server.url, { token: `tok-${user}`, WebSocket });
  closers.push(() => client.close());
  return client;
}

/**
 * Type a message, click Send, wait for its answer to end; resolves with the answer's element.
 * @param {import("playwright-core").Page} page @param {string} text @param {string} model
 */
async function sendAndWait(page, text, model) {
  const before = await page.locator("article[data-job-id]").count();
  await page.selectOption("#model", model);
  await page.fill("#prompt", text);
  await page.click("#send");
  const answer = page.locator("article[data-job-id]").nth(before);
  await answer.waitFor();
  await page.waitForSelector(`article[data-job-id="${await answer.getAttribute("data-job-id")}"][data-status=completed]`);
  return answer;
}

/** @typedef {{ x: number, y: number, width: number, height: number }} Box */

/** @param {Box} a @param {Box} b */
const overlap = (a, b) => a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height;

/** @param {import("playwright-core").Page} page */
const layout = (page) =>
  page.evaluate(() => ({
    scrollWidth: /** @type {Element} */ (document.scrollingElement).scrollWidth,
    innerWidth,
    innerHeight,
  }));

/** The box of an element as laid out (zero when it is hidden), in viewport pixels. */
const boxOf = (/** @type {import("playwright-core").Page} */ page, /** @type {string} */ selector) =>
  page.$eval(selector, (element) => {
    const { x, y, width, height } = element.getBoundingClientRect();
    return { x, y, width, height };
  });

/** @param {import("playwright-core").Page} page */
async function assertFitsWidth(page) {
  const { scrollWidth, innerWidth } = await layout(page);
  assert.ok(scrollWidth <= innerWidth, `the page scrolls sideways: ${scrollWidth} > ${innerWidth}`);
}

/** @param {import("playwright-core").Page} page @param {string} selector */
async function assertInViewport(page, selector) {
  const box = await boxOf(page, selector);
  const { innerWidth, innerHeight } = await layout(page);
  assert.ok(box.width > 0 && box.height > 0, `${selector} is not shown`);
  assert.ok(box.x >= 0 && box.y >= 0 && box.x + box.width <= innerWidth && box.y + box.height <= innerHeight,
    `${selector} at ${JSON.stringify(box)} is outside ${innerWidth}x${innerHeight}`);
}

const HOSTILE = [
  "Here is **bold** and `inline code`, then a list:",
  "",
  "- first item",
  "- second item",
  "",
  "```",
  `const line = "${"a very long line of code ".repeat(12)}";`,
  "```",
  "",
  "[a real link](https://example.com/docs) and [a trap](javascript:window.pwned=1)",
  "",
  '<img src=x onerror="window.pwned=2"> <script>window.pwned=3</script>',
  '<a href="javascript:window.pwned=4" onclick="window.pwned=5">click</a> <iframe src="javascript:window.pwned=6"></iframe>',
  '<div style="position:fixed;inset:0" onmouseover="window.pwned=7">cover</div> <svg onload="window.pwned=8"></svg>',
].join("\n");

describe("the demo page", { concurrency: 3 }, () => {
  test("at phone size: no sideways scroll, Send on screen, threads in a drawer from the header", async () => {
    const { page, problems } = await chat("phone", PHONE);
    await page.waitForSelector(".suggestion");
    await assertFitsWidth(page);
    await assertInViewport(page, "#send");
    await assertInViewport(page, "#menu");
    assert.equal(await page.isVisible("#new-thread"), false, "the drawer starts closed");
    await screenshot(page, "demo-phone-empty");

    const answer = await sendAndWait(page, HOSTILE, "backstream/echo");
    const first = await answer.getAttribute("data-job-id");
    await assertFitsWidth(page); // a long code line scrolls inside its block, not the page
    await assertInViewport(page, "#send");
    await screenshot(page, "demo-phone-answer");

    await page.click("#menu");
    await page.waitForSelector("#new-thread", { state: "visible" });
    assert.equal(await page.getAttribute("#menu", "aria-expanded"), "true");
    await assertInViewport(page, "#new-thread");
    await assertInViewport(page, "#sign-out");
    await assertFitsWidth(page);
    await screenshot(page, "demo-phone-drawer");
    await page.click("#new-thread");
    await page.waitForSelector("#new-thread", { state: "hidden" });
    await page.waitForSelector(".suggestion");
    assert.equal(await page.locator("article[data-job-id]").count(), 0, "a new chat is empty");

    await page.click("#menu");
    const threadA = page.locator(".thread-item").nth(1);
    await threadA.click();
    await page.waitForSelector(`article[data-job-id="${first}"]`);
    await page.waitForSelector("#new-thread", { state: "hidden" });
    await page.click("#menu");
    await page.click("#scrim", { position: { x: PHONE.width - 20, y: PHONE.height / 2 } });
    await page.waitForSelector("#new-thread", { state: "hidden" });
    await page.click("#menu");
    assert.equal(await page.evaluate(() => document.activeElement?.id), "new-thread", "the open drawer has the focus");
    await page.keyboard.press("Escape");
    await page.waitForSelector("#new-thread", { state: "hidden" });
    assert.equal(await page.evaluate(() => document.activeElement?.id), "menu");
    assert.deepEqual(problems, []);
  });

  test("answers render as Markdown, and nothing hostile in them runs or reaches the DOM", async () => {
    const { page, problems } = await chat("markdown", DESKTOP);
    const dialogs = /** @type {string[]} */ ([]);
    page.on("dialog", (dialog) => {
      dialogs.push(dialog.message());
      dialog.dismiss().catch(() => {});
    });
    const answer = await sendAndWait(page, HOSTILE, "backstream/echo");
    await screenshot(page, "demo-markdown");
    const text = answer.locator(".part-text");
    assert.equal(await text.locator("strong").innerText(), "bold");
    assert.equal(await text.locator("p > code").innerText(), "inline code");
    assert.deepEqual(await text.locator("ul > li").allInnerTexts(), ["first item", "second item"]);
    assert.match(await text.locator("pre > code").innerText(), /^const line = "a very long line/);
    const links = await text.locator("a").evaluateAll((as) => as.map((a) => [a.textContent, a.getAttribute("href"), a.getAttribute("rel")]));
    assert.deepEqual(links.find(([label]) => label === "a real link"), ["a real link", "https://example.com/docs", "noopener noreferrer nofollow"]);
    // Nothing executable reached the page: no such element, no handler, no javascript: URL.
    const found = await page.$eval("#messages", (messages) => {
      const elements = [...messages.querySelectorAll("*")];
      return {
        dangerous: [...messages.querySelectorAll(".part-text script, .part-text img, .part-text iframe, .part-text svg, .part-text style, .part-text [style]")].length,
        handlers: elements.flatMap((e) => [...e.attributes].map((a) => a.name)).filter((name) => name.startsWith("on")),
        urls: elements.flatMap((e) => [...e.attributes].map((a) => a.value)).filter((value) => /^\s*javascript:/i.test(value)),
      };
    });
    assert.equal(found.dangerous, 0);
    assert.deepEqual(found.handlers, []);
    assert.deepEqual(found.urls, []);
    // Hovering and clicking what is left runs nothing either.
    assert.equal(await text.locator("a", { hasText: "a trap" }).getAttribute("href"), null);
    await text.locator("a", { hasText: "a trap" }).click();
    // HTML in an answer is shown as the text it is.
    const said = await text.innerText();
    for (const raw of ["<script>window.pwned=3</script>", '<img src=x onerror="window.pwned=2">', "<iframe src="]) {
      assert.ok(said.includes(raw), `${raw} is shown as text`);
    }
    await text.hover();
    await sleep(200);
    assert.equal(await page.evaluate(() => /** @type {any} */ (window).pwned), undefined);
    assert.deepEqual(dialogs, []);
    // The user's own message is shown as typed, never parsed.
    assert.equal(await page.locator(".msg.user .bubble").innerText(), HOSTILE);
    assert.deepEqual(problems, []);
  });

  test("a streaming answer is Markdown as it grows", async () => {
    const { page, problems } = await chat("streaming", DESKTOP);
    const words = Array.from({ length: 300 }, (_, i) => `word${i + 1}`).join(" ");
    await page.selectOption("#model", "backstream/echo");
    await page.fill("#prompt", `Some **bold** first, then:\n\n1. one\n2. two\n\n${words}`);
    await page.press("#prompt", "Enter");
    const running = page.locator("article[data-job-id][data-status=running] .part-text");
    await running.locator("ol > li", { hasText: "two" }).waitFor();
    assert.equal(await running.locator("strong").innerText(), "bold");
    assert.equal(await running.locator("p").first().innerText(), "Some bold first, then:");
    // Drawing the growing answer again leaves what did not change in place (no flicker).
    const article = page.locator("article[data-job-id]");
    const seq = Number(await article.getAttribute("data-seq"));
    const first = await running.locator("p").first().elementHandle();
    await page.waitForFunction((min) => Number(document.querySelector("article[data-job-id]")?.getAttribute("data-seq")) >= min, seq + 10);
    assert.equal(await first?.evaluate((node) => node.isConnected), true, "the first paragraph was redrawn");
    await page.click("#stop");
    await page.waitForSelector("article[data-job-id][data-status=aborted]");
    assert.deepEqual(problems, []);
  });

  for (const [user, size] of /** @type {const} */ ([["toast-desktop", DESKTOP], ["toast-phone", PHONE]])) {
    test(`toasts cover neither the notifications panel nor the chat's header (${size.width}x${size.height})`, async () => {
      const { page, problems } = await chat(user, size);
      const admin = await serverClient(user);
      /** A job waiting for an approval in a thread the page has left; approving it raises a toast. */
      const waitingElsewhere = async (/** @type {string} */ text) => {
        await page.selectOption("#model", "backstream/tools-demo");
        await page.fill("#prompt", text);
        await page.click("#send");
        const pending = page.locator("article[data-job-id] .tool-pending").last();
        await pending.waitFor();
        const jobId = /** @type {string} */ (await page.locator("article[data-job-id]").last().getAttribute("data-job-id"));
        const callId = /** @type {string} */ (await pending.getAttribute("data-call-id"));
        if (size === PHONE) await page.click("#menu");
        await page.click("#new-thread");
        return () => admin.approve(jobId, callId, true);
      };
      const controls = ["#bell", "#mute", ".chat-head", "#composer", "#send"];
      if (size === PHONE) controls.push("#menu");

      const approveFirst = await waitingElsewhere("Please send a note to Ada.");
      await approveFirst();
      await page.waitForSelector(".toast", { state: "visible" });
      const toast = await boxOf(page, ".toast");
      for (const control of controls) {
        const covered = await boxOf(page, control);
        assert.ok(!overlap(toast, covered), `a toast at ${JSON.stringify(toast)} covers ${control} at ${JSON.stringify(covered)}`);
      }
      await screenshot(page, `demo-toast-${size.width}`);

      // With the panel open, a new toast covers neither its header nor its list.
      const approveSecond = await waitingElsewhere("Please send a note to Grace.");
      await page.click("#bell");
      await page.waitForSelector("#panel", { state: "visible" });
      await approveSecond();
      await page.waitForFunction(() => document.querySelectorAll(".notification").length >= 2);
      await page.waitForSelector(".toast", { state: "attached" });
      // All at once: an older toast may go away (after 7 s) between two calls.
      const toasts = await page.$$eval(".toast", (elements) => elements.map((element) => {
        const { x, y, width, height } = element.getBoundingClientRect();
        return { x, y, width, height };
      }));
      assert.ok(toasts.length > 0);
      for (const box of toasts) {
        for (const control of [".panel-head", "#mark-all-read", "#notification-list", "#bell"]) {
          assert.ok(!overlap(box, await boxOf(page, control)), `a toast covers ${control} of the open panel`);
        }
      }
      await screenshot(page, `demo-panel-${size.width}`);
      await assertFitsWidth(page);
      assert.deepEqual(problems, []);
    });
  }

  test("each thread keeps its model, a suggestion's too, across a reload", async () => {
    const { page, problems } = await chat("models", DESKTOP);
    // The suggestion's model is not the picker's first option, nor the last one picked by hand.
    await page.click('.suggestion[data-model="backstream/lorem"]');
    await page.waitForSelector("article[data-job-id]");
    const threadA = /** @type {string} */ (await page.getAttribute(".thread-item.active", "data-thread-id"));
    await page.click("#stop");
    await page.waitForSelector("article[data-job-id][data-status=aborted]");
    await page.click("#new-thread");
    await sendAndWait(page, "Hello there", "backstream/echo");
    const threadB = /** @type {string} */ (await page.getAttribute(".thread-item.active", "data-thread-id"));
    assert.equal(await page.inputValue("#model"), "backstream/echo");

    await page.click(`.thread-item[data-thread-id="${threadA}"]`);
    assert.equal(await page.inputValue("#model"), "backstream/lorem", "opening a thread shows its model");
    await page.reload();
    await page.waitForSelector("#connection[data-state=open]");
    await page.waitForSelector(`.thread-item.active[data-thread-id="${threadA}"]`);
    assert.equal(await page.inputValue("#model"), "backstream/lorem", "after a reload too");
    await page.click(`.thread-item[data-thread-id="${threadB}"]`);
    assert.equal(await page.inputValue("#model"), "backstream/echo");

    // A model picked in an empty thread is kept for it, before anything is sent.
    await page.click("#new-thread");
    await page.selectOption("#model", "backstream/tools-demo");
    const threadC = /** @type {string} */ (await page.getAttribute(".thread-item.active", "data-thread-id"));
    await page.click(`.thread-item[data-thread-id="${threadA}"]`);
    await page.click(`.thread-item[data-thread-id="${threadC}"]`);
    assert.equal(await page.inputValue("#model"), "backstream/tools-demo");
    assert.deepEqual(problems, []);
  });
});
