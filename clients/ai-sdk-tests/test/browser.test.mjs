// @ts-check
// A web page built on the AI SDK, in headless Chromium: it authenticates with a cookie,
// is reloaded mid-answer, resumes, and shows the whole answer once; with a refused token it
// reads the close code 4401 and its reason.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { chromium } from 'playwright-core';
import { SERVER_URL, report } from './helpers.mjs';
import { CHROMIUM, FLAGS, servePage } from './page-server.mjs';

/** @param {import('playwright-core').Page} page @param {string} expression */
function evaluate(page, expression) {
  return page.evaluate(expression);
}

const COOKIE = process.env.BACKSTREAM_AUTH_COOKIE ?? 'bs_token';

test('a page reloaded mid-answer resumes and shows the whole answer once', async () => {
  const { server, origin } = await servePage();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, headless: true });
  try {
    const context = await browser.newContext();
    // The token travels as a cookie: cookies are per host, so the page's cookie for
    // 127.0.0.1 goes with the WebSocket handshake to the server's port.
    await context.addCookies([{ name: COOKIE, value: 'tok-alice', url: origin }]);
    const page = await context.newPage();
    const address = `${origin}/?chat=browser-chat&server=${encodeURIComponent(SERVER_URL)}`;
    await page.goto(address);
    await page.waitForFunction('typeof page === "object"');
    void evaluate(page, 'page.send("write something")').catch(() => {});
    await page.waitForFunction('page.text().trim().split(/\\s+/).length >= 10', null, { timeout: 20000 });
    const partial = String(await evaluate(page, 'page.text()'));

    await page.reload(); // the user reloads mid-answer: the socket goes, the job goes on
    await page.waitForFunction('typeof page === "object"');
    assert.equal(await evaluate(page, 'page.text()'), '');
    await evaluate(page, 'page.resume()');
    await page.waitForFunction('page.status() === "ready"', null, { timeout: 20000 });
    const text = String(await evaluate(page, 'page.text()'));
    const ids = /** @type {string[]} */ (await evaluate(page, 'page.messageIds()'));
    assert.equal(ids.length, 1, 'one assistant message');
    assert.ok(text.startsWith(partial));
    assert.equal(text.trim().split(/\s+/).length, 80);

    // Another browser profile, without the cookie, with a token the server refuses: the
    // page reads why, not a bare "network connection failed".
    const signedOut = await (await browser.newContext()).newPage();
    await signedOut.goto(address);
    await signedOut.waitForFunction('typeof page === "object"');
    const failure = /** @type {{message: string, closed: {code: number, reason: string} | undefined}} */ (
      await evaluate(signedOut, 'page.failure("tok-nobody")')
    );
    assert.deepEqual(failure.closed?.code, 4401, failure.message);
    report({ chatId: 'browser-chat', partial, text, failure });
  } finally {
    await browser.close();
    server.close();
  }
});
