// @ts-check
// A step whose tool calls mix a tool that runs by itself and tools that need a person: the
// official `lastAssistantMessageIsCompleteWithApprovalResponses` sends each decision, and the
// job goes on to its answer (one approval in the step, then two).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { lastAssistantMessageIsCompleteWithApprovalResponses } from 'ai';
import { PlainChat, report, textOf, transportFor, until } from './helpers.mjs';

/** @typedef {import('ai').UIMessagePart<any, any>} Part */
/** @typedef {import('ai').UIMessage} UIMessage */

/**
 * Answer every approval the chat asks for, as a person clicking "approve" would, until the
 * answer has text after its tools; return the decisions made, in order.
 * @param {PlainChat} chat
 */
async function approveAll(chat) {
  /** @type {string[]} */
  const approved = [];
  for (;;) {
    await until(() => chat.status === 'ready', `the response after ${approved.length} decisions`);
    const asking = (chat.lastMessage?.parts ?? []).filter(
      /** @param {Part} p */ p => 'state' in p && p.state === 'approval-requested',
    );
    if (asking.length === 0) return approved;
    assert.equal(asking.length, 1, 'one approval is asked at a time');
    const [part] = asking;
    assert.ok('approval' in part && part.approval && 'toolCallId' in part);
    approved.push(part.toolCallId);
    await chat.addToolApprovalResponse({ id: part.approval.id, approved: true });
  }
}

/** @param {UIMessage | undefined} message */
function toolStates(message) {
  return (message?.parts ?? [])
    .filter(/** @param {Part} p */ p => p.type.startsWith('tool-'))
    .map(/** @param {Part} p */ p => [p.type, 'state' in p ? p.state : '?']);
}

/**
 * @param {string} chatId
 * @param {object} body
 * @param {string} text
 */
async function converse(chatId, body, text) {
  const transport = transportFor('tok-alice', body);
  /** @type {Error[]} */
  const errors = [];
  const chat = new PlainChat({
    id: chatId,
    transport,
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
    onError: error => errors.push(error),
  });
  await chat.sendMessage({ text });
  const approved = await approveAll(chat);
  transport.close();
  assert.deepEqual(errors, []);
  assert.equal(chat.messages.length, 2, 'one assistant message holds the whole answer');
  return { approved, states: toolStates(chat.lastMessage), text: textOf(chat.lastMessage) };
}

test('the demo suggestion: calculate and clock_now run, send_note waits for a person', async () => {
  const demo = await converse(
    'chat-demo-mixed',
    { model: 'backstream/tools-demo', tools: ['calculate', 'clock_now', 'send_note'] },
    'What is 1337 * 42, and what time is it? Then send a note to Ada.',
  );
  assert.deepEqual(demo.states, [
    ['tool-calculate', 'output-available'],
    ['tool-clock_now', 'output-available'],
    ['tool-send_note', 'output-available'],
  ]);
  assert.match(demo.text, /56154/);

  const several = await converse(
    'chat-several-mixed',
    { model: 'test-model', tools: ['calculate', 'delete_files'] },
    'add 2 and 3, then delete twice',
  );
  assert.deepEqual(several.states, [
    ['tool-calculate', 'output-available'],
    ['tool-delete_files', 'output-available'],
    ['tool-delete_files', 'output-available'],
  ]);
  assert.equal(several.text, 'All done.');
  report({ demo, several, demoChatId: 'chat-demo-mixed', severalChatId: 'chat-several-mixed' });
});
