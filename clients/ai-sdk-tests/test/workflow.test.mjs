// @ts-check
// A workflow through useChat's Chat: the model workflow/demo; each step arrives as a data part
// (data-backstream-step, updated in place when it finishes), the approval it asks for as a tool
// part `approve`, answered as any tool's.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { lastAssistantMessageIsCompleteWithApprovalResponses } from 'ai';
import { PlainChat, report, textOf, transportFor, until } from './helpers.mjs';

/** @typedef {import('ai').UIMessagePart<any, any>} Part */

/** @param {import('ai').UIMessage | undefined} message */
const stepsOf = message =>
  (message?.parts ?? [])
    .filter(/** @param {Part} p */ p => p.type === 'data-backstream-step')
    .map(/** @param {any} p */ p => ({ id: p.id, ...p.data }));

test('a workflow: its steps as data parts, its approval as a tool part', async () => {
  const transport = transportFor('tok-alice', { model: 'workflow/demo' });
  const chatId = 'chat-workflow';
  /** @type {Error[]} */
  const errors = [];
  const chat = new PlainChat({
    id: chatId,
    transport,
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
    onError: error => errors.push(error),
  });
  await chat.sendMessage({ text: 'Compute it and tell me the time.' });
  await until(() => chat.status === 'ready', 'the workflow to ask');
  const asking = chat.lastMessage;
  const waiting = stepsOf(asking);
  assert.deepEqual(
    waiting.map(s => [s.id, s.name, s.status]),
    [
      ['step-1', 'model:backstream/echo', 'finished'],
      ['step-2', 'tool:calculate', 'finished'],
      ['step-3', 'tool:clock_now', 'finished'],
      ['step-4', 'approve', 'running'],
    ],
  );
  const part = asking?.parts.find(/** @param {Part} p */ p => p.type === 'tool-approve');
  assert.ok(part && 'state' in part && part.state === 'approval-requested', JSON.stringify(asking?.parts));
  assert.ok('approval' in part && part.approval);
  assert.deepEqual('input' in part && part.input, { prompt: 'Write the summary of 6 * 7 = 42?' });

  await chat.addToolApprovalResponse({ id: part.approval.id, approved: true });
  await until(() => chat.status === 'ready' && stepsOf(chat.lastMessage).length === 5, 'the workflow to end');
  assert.deepEqual(errors, []);
  const done = chat.lastMessage;
  assert.equal(done?.id, asking?.id, 'the same assistant message goes on');
  const steps = stepsOf(done);
  assert.deepEqual(steps.map(s => s.status), ['finished', 'finished', 'finished', 'finished', 'finished']);
  assert.equal(steps[1].summary, '42');
  const approved = done?.parts.find(/** @param {Part} p */ p => p.type === 'tool-approve');
  assert.equal(approved && 'state' in approved && approved.state, 'output-available');
  transport.close();
  report({ chatId, text: textOf(done), steps });
});
