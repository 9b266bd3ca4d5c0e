// Headless Chromium (Debian's, never a downloaded one) driven by playwright-core.

import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { REPO } from "../helpers.js";

export const CHROMIUM = process.env.BACKSTREAM_CHROMIUM ?? "/usr/bin/chromium";
export const RESULTS = process.env.BACKSTREAM_TEST_RESULTS ?? join(REPO, "test-results");

export async function launch() {
  if (!existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  mkdirSync(RESULTS, { recursive: true });
  // playwright gives the browser a fresh --user-data-dir of its own.
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/**
 * A page in a fresh context (its own localStorage), recording console errors and warnings,
 * uncaught exceptions, and the frames it sends on its WebSockets.
 * @param {import("playwright-core").Browser} browser
 */
export async function openPage(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, reducedMotion: "reduce" });
  const page = await context.newPage();
  const problems = /** @type {string[]} */ ([]);
  const sent = /** @type {any[]} */ ([]);
  page.on("console", (message) => {
    if (message.type() === "error" || message.type() === "warning") problems.push(`${message.type()}: ${message.text()}`);
  });
  page.on("pageerror", (error) => problems.push(`uncaught: ${error.message}`));
  page.on("websocket", (ws) => {
    ws.on("framesent", (frame) => {
      if (typeof frame.payload === "string") sent.push(JSON.parse(frame.payload));
    });
  });
  return { context, page, problems, sent };
}

/**
 * @param {import("playwright-core").Page} page
 * @param {string} name
 */
export function screenshot(page, name) {
  return page.screenshot({ path: join(RESULTS, `${name}.png`) });
}
