// @ts-check
// A tool that needs a person: the stream stops at the approval request; the UI's answer,
// sent as useChat sends it, resumes the job on the server.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { lastAssistantMessageIsCompleteWithApprovalResponses } from 'ai';
import { PlainChat, report, textOf, transportFor, until } from './helpers.mjs';

/** @typedef {import('ai').UIMessagePart<any, any>} Part */

test('approval round trip through a Chat', async () => {
  const transport = transportFor('tok-alice', { model: 'test-model', tools: ['delete_files'] });
  const chatId = 'chat-approval';
  /** @type {Error[]} */
  const errors = [];
  const chat = new PlainChat({
    id: chatId,
    transport,
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
    onError: error => errors.push(error),
  });
  await chat.sendMessage({ text: 'delete files 2 and 3' });
  await until(() => chat.status === 'ready', 'the first response to end');
  const asking = chat.lastMessage;
  assert.equal(asking?.role, 'assistant');
  const part = asking?.parts.find(/** @param {Part} p */ p => p.type === 'tool-delete_files');
  assert.ok(part && 'state' in part, JSON.stringify(asking?.parts));
  assert.equal(part.state, 'approval-requested');
  assert.ok('approval' in part && part.approval);
  assert.deepEqual('input' in part && part.input, { a: 2, b: 3 });

  await chat.addToolApprovalResponse({ id: part.approval.id, approved: true });
  await until(
    () => chat.status === 'ready' && textOf(chat.lastMessage) === 'Deleted 5 files.',
    'the answer after the approval',
  );
  assert.deepEqual(errors, []);
  const done = chat.lastMessage;
  assert.equal(done?.id, asking?.id, 'the same assistant message goes on');
  assert.equal(chat.messages.length, 2);
  const result = done?.parts.find(/** @param {Part} p */ p => p.type === 'tool-delete_files');
  assert.ok(result && 'state' in result);
  assert.equal(result.state, 'output-available');
  assert.equal('output' in result && result.output, '5');
  transport.close();

  // Reloaded while the job waits: the resumed page shows the request, and a denial goes through.
  const firstPage = transportFor('tok-alice', { model: 'test-model', tools: ['delete_files'] });
  const waiting = new PlainChat({ id: 'chat-deny', transport: firstPage });
  await waiting.sendMessage({ text: 'delete files 1 and 1' });
  await until(() => waiting.status === 'ready', 'the approval request');
  firstPage.close();
  const reloadedTransport = transportFor('tok-alice');
  const reloaded = new PlainChat({
    id: 'chat-deny',
    transport: reloadedTransport,
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
  });
  await reloaded.resumeStream();
  await until(() => reloaded.status === 'ready', 'the replay');
  const replayed = reloaded.lastMessage?.parts.find(/** @param {Part} p */ p => p.type === 'tool-delete_files');
  assert.ok(replayed && 'approval' in replayed && replayed.approval, JSON.stringify(reloaded.messages));
  assert.equal(replayed.state, 'approval-requested');
  await reloaded.addToolApprovalResponse({ id: replayed.approval.id, approved: false });
  await until(
    () => reloaded.status === 'ready' && textOf(reloaded.lastMessage) === 'Not deleted.',
    'the answer after the denial',
  );
  const denied = reloaded.lastMessage?.parts.find(/** @param {Part} p */ p => p.type === 'tool-delete_files');
  assert.equal(denied && 'state' in denied && denied.state, 'output-denied');
  reloadedTransport.close();
  report({ chatId, deniedChatId: 'chat-deny' });
});
