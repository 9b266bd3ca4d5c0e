// @ts-check
// A tool the page runs itself, in headless Chromium: the model calls it beside a server tool;
// the stream hands the call to the page (onToolCall), which answers with addToolOutput; the
// Chat sends again (lastAssistantMessageIsCompleteWithToolCalls) and the answer goes on in
// the same assistant message.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { chromium } from 'playwright-core';
import { SERVER_URL, report } from './helpers.mjs';
import { CHROMIUM, FLAGS, servePage } from './page-server.mjs';

const COOKIE = process.env.BACKSTREAM_AUTH_COOKIE ?? 'bs_token';

test('a client-side tool answered by the page, beside a server tool', async () => {
  const { server, origin } = await servePage();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, headless: true });
  try {
    const context = await browser.newContext();
    await context.addCookies([{ name: COOKIE, value: 'tok-alice', url: origin }]);
    const page = await context.newPage();
    const chatId = 'tool-chat';
    await page.goto(`${origin}/?toolChat=${chatId}&server=${encodeURIComponent(SERVER_URL)}`);
    await page.waitForFunction('typeof page === "object"');
    void page.evaluate('page.askWithClientTool("where am I, and what is 6*7?")').catch(() => {});
    await page.waitForFunction(
      `page.toolChatStatus() === "ready" && page.text() === "You are in Paris; 6*7 is 42."`,
      null,
      { timeout: 30000 },
    );
    const messages = /** @type {any[]} */ (await page.evaluate('page.toolChatMessages()'));
    assert.deepEqual(
      messages.map(m => m.role),
      ['user', 'assistant'],
      'the answer went on in the same assistant message',
    );
    const tools = messages[1].parts
      .filter((/** @type {any} */ p) => p.type.startsWith('tool-'))
      .map((/** @type {any} */ p) => ({ type: p.type, state: p.state, output: p.output }));
    assert.deepEqual(tools, [
      { type: 'tool-getLocation', state: 'output-available', output: 'Paris' },
      { type: 'tool-calculate', state: 'output-available', output: '42' },
    ]);
    report({ chatId, assistantId: messages[1].id, tools });
  } finally {
    await browser.close();
    server.close();
  }
});
