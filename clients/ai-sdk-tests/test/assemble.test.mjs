// @ts-check
// A send starts a job; its chunks, read by readUIMessageStream, assemble the answer.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { finalMessage, recording, report, send, textOf, transportFor, userMessage } from './helpers.mjs';

test('send streams the job as a UI message, and a repeated send joins the same job', async () => {
  const transport = transportFor('tok-alice');
  const chatId = 'chat-assemble';
  const messages = [userMessage('u1', 'the quick brown fox jumps')];
  /** @type {import('ai').UIMessageChunk[]} */
  const chunks = [];
  const message = await finalMessage(recording(await send(transport, chatId, messages), chunks));
  assert.ok(message);
  assert.equal(message.role, 'assistant');
  assert.equal(textOf(message), 'the quick brown fox jumps');
  const types = chunks.map(c => c.type);
  assert.deepEqual(types.slice(0, 3), ['start', 'start-step', 'text-start']);
  assert.deepEqual(types.slice(-3), ['text-end', 'finish-step', 'finish']);
  assert.ok(types.filter(t => t === 'text-delta').length >= 5, 'the text arrives in pieces');
  const finish = chunks.at(-1);
  assert.equal(finish?.type === 'finish' && finish.finishReason, 'stop');

  // The same chat and user message: the same job, replayed from its start.
  const again = await finalMessage(await send(transport, chatId, messages));
  assert.equal(again?.id, message.id);
  assert.equal(textOf(again), textOf(message));
  transport.close();
  report({ chatId, messageId: message.id, text: textOf(message) });
});
