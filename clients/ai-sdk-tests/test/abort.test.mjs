// @ts-check
// Stop aborts the job the request started; closing the socket does not.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { readUIMessageStream } from 'ai';
import { report, send, textOf, transportFor, userMessage } from './helpers.mjs';

const body = { model: 'backstream/lorem', params: { max_tokens: 200, tokens_per_s: 100 } };

test('aborting the request aborts its job; a closed socket leaves its job running', async () => {
  const transport = transportFor('tok-alice', body);
  const controller = new AbortController();
  let seen = '';
  const stream = await send(transport, 'chat-abort', [userMessage('u1', 'go')], controller.signal);
  for await (const message of readUIMessageStream({ stream })) {
    seen = textOf(message);
    if (seen.length > 0) {
      controller.abort();
      break;
    }
  }
  assert.ok(seen.length > 0);

  const leaver = transportFor('tok-alice', body);
  let left = '';
  await assert.rejects(async () => {
    for await (const message of readUIMessageStream({
      stream: await send(leaver, 'chat-leave', [userMessage('u1', 'go')]),
      terminateOnError: true,
    })) {
      left = textOf(message);
      if (left.length > 0) leaver.close(); // the socket closes; no abort is sent
    }
  }, /closed/);
  assert.ok(left.length > 0);
  transport.close();
  report({ aborted: 'chat-abort', left: 'chat-leave' });
});
