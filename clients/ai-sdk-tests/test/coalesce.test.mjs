// @ts-check
// A connection with coalesce_ms gets few frames for a fast answer; the SDK assembles it whole,
// live and when it resumes (a replay from `start`, as the transport asks).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  finalMessage,
  recordingWebSocket,
  report,
  send,
  textOf,
  transportFor,
  userMessage,
} from './helpers.mjs';

const body = { model: 'backstream/lorem', params: { max_tokens: 200, tokens_per_s: 200 } };

/** @param {any[]} frames */
function chunkFrames(frames) {
  return frames.filter(frame => frame.type === 'chunk');
}

test('coalesce_ms merges text deltas into few frames, numbered without gaps', async () => {
  const chatId = 'chat-coalesce';
  /** @type {any[]} */
  const liveFrames = [];
  const transport = transportFor('tok-alice', body, { coalesce_ms: '100' }, recordingWebSocket(liveFrames));
  const message = await finalMessage(await send(transport, chatId, [userMessage('u1', 'write')]));
  assert.ok(message);
  const text = textOf(message);
  assert.equal(text.trim().split(/\s+/).length, 200);
  const live = chunkFrames(liveFrames);
  assert.deepEqual(
    live.map(frame => frame.sequence),
    live.map((_, index) => index),
    'sequences from 0, contiguous',
  );
  const deltas = live.filter(frame => frame.chunk.type === 'text-delta').length;
  transport.close();

  /** @type {any[]} */
  const replayFrames = [];
  const again = transportFor('tok-alice', body, { coalesce_ms: '100' }, recordingWebSocket(replayFrames));
  const stream = await again.reconnectToStream({ chatId });
  assert.ok(stream, 'the finished job is found');
  const replayed = await finalMessage(stream);
  assert.equal(replayed?.id, message.id);
  assert.equal(textOf(replayed), text);
  again.close();
  report({
    chatId,
    text,
    replayText: textOf(replayed),
    chunkFrames: live.length,
    textDeltaFrames: deltas,
    replayChunkFrames: chunkFrames(replayFrames).length,
  });
});
