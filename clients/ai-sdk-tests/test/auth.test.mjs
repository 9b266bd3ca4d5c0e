// @ts-check
// A token the server refuses: the Chat's error says so (close code 4401 and a reason), where
// a refused handshake would only say "network connection failed".
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PlainChat, report, transportFor, until } from './helpers.mjs';

/**
 * What `onError` sees of a send, or of a resume (a page that reloads), with `token`.
 * @param {string} token
 * @param {'send' | 'resume'} how
 */
async function failureOf(token, how) {
  const transport = transportFor(token);
  /** @type {Error[]} */
  const errors = [];
  const chat = new PlainChat({ id: `refused-${how}`, transport, onError: error => errors.push(error) });
  if (how === 'send') await chat.sendMessage({ text: 'hello?' });
  else await chat.resumeStream();
  await until(() => errors.length > 0, `the error of the ${how}`);
  assert.equal(chat.status, 'error');
  assert.equal(chat.messages.filter(m => m.role === 'assistant').length, 0, 'no answer');
  transport.close();
  return errors[0].message;
}

test('a refused token is an error naming close code 4401 and its reason', async () => {
  const send = await failureOf('tok-nobody', 'send');
  assert.match(send, /^WebSocket chat network connection closed \(code 4401: unauthorized: /);
  report({ send, resume: await failureOf('', 'resume') });
});
