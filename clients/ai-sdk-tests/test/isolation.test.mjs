// @ts-check
// Another user's chat does not exist for them; a bad token's stream fails with close 4401.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { finalMessage, report, send, transportFor, userMessage } from './helpers.mjs';

test("another user's chat is no-active, and a bad token is refused", async () => {
  const chatId = 'chat-private';
  const alice = transportFor('tok-alice');
  await finalMessage(await send(alice, chatId, [userMessage('u1', 'my secret')]));
  alice.close();

  const bob = transportFor('tok-bob');
  const found = await bob.reconnectToStream({ chatId });
  bob.close();

  const stranger = transportFor('not-a-token');
  const refused = await send(stranger, chatId, [userMessage('u1', 'hi')]);
  await assert.rejects(refused.pipeTo(new WritableStream()), /connection closed \(code 4401: unauthorized/);
  stranger.close();
  report({ chatId, bobFound: found !== null });
});
