// @ts-check
// A server-side tool loop: argument fragments stream as tool-input-delta, then the result.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { finalMessage, recording, report, send, textOf, transportFor } from './helpers.mjs';

test('a tool call streams its input, its output, and the next step', async () => {
  const transport = transportFor('tok-alice', {
    model: 'test-model',
    params: { temperature: 0.5 },
    tools: ['calculate'],
  });
  const chatId = 'chat-tools';
  /** @type {import('ai').UIMessageChunk[]} */
  const chunks = [];
  const stream = await send(transport, chatId, [
    { id: 's1', role: 'system', parts: [{ type: 'text', text: 'Be brief.' }] },
    { id: 'u1', role: 'user', parts: [{ type: 'text', text: 'what is 6*7?' }] },
  ]);
  const message = await finalMessage(recording(stream, chunks));
  transport.close();

  const deltas = chunks.flatMap(c => (c.type === 'tool-input-delta' ? [c.inputTextDelta] : []));
  assert.ok(deltas.length >= 2, `the arguments arrive in fragments: ${JSON.stringify(deltas)}`);
  assert.equal(deltas.join(''), '{"expression": "6*7"}');
  const types = chunks.map(c => c.type);
  assert.ok(types.indexOf('tool-input-start') < types.indexOf('tool-input-delta'));
  assert.ok(types.indexOf('tool-input-available') < types.indexOf('tool-output-available'));
  assert.equal(types.filter(t => t === 'start-step').length, 2, 'a step per model turn');

  const toolPart = message?.parts.find(p => p.type === 'tool-calculate');
  assert.ok(toolPart && 'state' in toolPart, JSON.stringify(message?.parts));
  assert.equal(toolPart.state, 'output-available');
  assert.deepEqual('input' in toolPart && toolPart.input, { expression: '6*7' });
  assert.equal('output' in toolPart && toolPart.output, '42');
  assert.equal(textOf(message), 'The answer is 42.');
  report({ chatId });
});
