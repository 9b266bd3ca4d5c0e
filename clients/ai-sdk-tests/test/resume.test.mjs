// @ts-check
// A stream broken mid-answer, resumed with a new transport (a reload), gives the whole answer once.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { finalMessage, report, send, textOf, transportFor, userMessage } from './helpers.mjs';
import { readUIMessageStream } from 'ai';

const body = { model: 'backstream/lorem', params: { max_tokens: 60, tokens_per_s: 40 } };

test('resume after a broken stream replays the whole message, live to its end', async () => {
  const chatId = 'chat-resume';
  const first = transportFor('tok-alice', body);
  let partial = '';
  let messageId = '';
  // The page goes away mid-answer: its socket closes. (Cancelling the stream instead would
  // send `abort`, which stops the job: that is what Stop does.)
  await assert.rejects(async () => {
    for await (const message of readUIMessageStream({
      stream: await send(first, chatId, [userMessage('u1', 'write')]),
      terminateOnError: true,
    })) {
      partial = textOf(message);
      messageId = message.id;
      if (partial.split(' ').length >= 10) first.close();
    }
  }, /closed/);

  const second = transportFor('tok-alice', body);
  const stream = await second.reconnectToStream({ chatId });
  assert.ok(stream, 'the running job is found');
  const resumed = await finalMessage(stream);
  assert.equal(resumed?.id, messageId, 'the same message, replaced rather than added');
  assert.ok(textOf(resumed).startsWith(partial));
  assert.equal(textOf(resumed).trim().split(/\s+/).length, 60);
  second.close();

  // Coming back after it ended (within retention): the whole answer, once.
  const third = transportFor('tok-alice', body);
  const after = await third.reconnectToStream({ chatId });
  assert.ok(after);
  const replayed = await finalMessage(after);
  assert.equal(textOf(replayed), textOf(resumed));
  third.close();
  report({ chatId, partial, text: textOf(resumed) });
});
