// @ts-check
// The page of the browser test: a chat as a web app builds it on the AI SDK, talking to
// backstream through WebSocketChatTransport (the browser's own WebSocket).
import { AbstractChat, WebSocketChatTransport, lastAssistantMessageIsCompleteWithToolCalls } from 'ai';

/** @typedef {import('ai').UIMessage} UIMessage */
/** @typedef {import('ai').ChatState<UIMessage>} ChatState */

/** @implements {ChatState} */
class PageChatState {
  constructor() {
    /** @type {import('ai').ChatStatus} */
    this.status = 'ready';
    /** @type {Error | undefined} */
    this.error = undefined;
    /** @type {UIMessage[]} */
    this.messages = [];
  }
  /** @param {UIMessage} message */
  pushMessage(message) {
    this.messages = this.messages.concat(message);
    render(this.messages);
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
    render(this.messages);
  }
  /** @param {number} index @param {UIMessage} message */
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
    render(this.messages);
  }
  /** @template T @param {T} thing @returns {T} */
  snapshot(thing) {
    return structuredClone(thing);
  }
}

/** @extends {AbstractChat<UIMessage>} */
class PageChat extends AbstractChat {
  /** @param {Omit<import('ai').ChatInit<UIMessage>, 'messages'>} init */
  constructor(init) {
    super({ ...init, state: new PageChatState() });
  }
}

/** @param {UIMessage[]} messages */
function render(messages) {
  const answer = messages.filter(m => m.role === 'assistant').at(-1);
  const text = (answer?.parts ?? []).map(p => (p.type === 'text' ? p.text : '')).join('');
  const out = document.getElementById('answer');
  if (out) out.textContent = text;
}

// As docs/http-apis.md shows it: the close code and reason in the transport's error (4401:
// sign in again); undefined when no server answered, or it refused the handshake.
/** @param {Error | undefined} error */
function closeOf(error) {
  const match = /connection closed \(code (\d+)(?:: (.*))?\)\.$/s.exec(error?.message ?? "");
  return match ? { code: Number(match[1]), reason: match[2] ?? "" } : undefined;
}

const query = new URLSearchParams(location.search);
const chat = new PageChat({
  id: query.get('chat') ?? 'browser-chat',
  // The one line an app changes: its transport.
  transport: new WebSocketChatTransport({
    url: query.get('server') ?? '',
    body: { model: 'backstream/lorem', params: { max_tokens: 80, tokens_per_s: 40 } },
  }),
});

// A tool the page runs itself (a client-side tool): the server hands its calls to the page,
// which answers with addToolOutput; the Chat then sends again and the answer goes on.
const CLIENT_TOOLS = [
  {
    type: 'function',
    function: {
      name: 'getLocation',
      description: "The user's city, as the browser knows it",
      parameters: { type: 'object', properties: {} },
    },
  },
];

const toolChat = new PageChat({
  id: query.get('toolChat') ?? 'tool-chat',
  transport: new WebSocketChatTransport({
    url: query.get('server') ?? '',
    body: { model: 'test-model', tools: ['calculate'], params: { client_tools: CLIENT_TOOLS } },
  }),
  sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
  onToolCall: ({ toolCall }) => {
    if (toolCall.toolName === 'getLocation') {
      void toolChat.addToolOutput({ tool: 'getLocation', toolCallId: toolCall.toolCallId, output: 'Paris' });
    }
  },
});

/** What the test drives. */
const page = {
  /** @param {string} text */
  send: text => chat.sendMessage({ text }),
  resume: () => chat.resumeStream(),
  status: () => chat.status,
  text: () => document.getElementById('answer')?.textContent ?? '',
  messageIds: () => chat.messages.map(m => m.id),
  /** @param {string} text */
  askWithClientTool: text => toolChat.sendMessage({ text }),
  toolChatStatus: () => toolChat.status,
  toolChatMessages: () => toolChat.messages,
  /** Send with `token` in the URL; resolve to what `onError` saw and `closeOf` read of it. */
  failure: (/** @type {string} */ token) =>
    new Promise(resolve => {
      const failing = new PageChat({
        id: 'refused-chat',
        transport: new WebSocketChatTransport({ url: query.get('server') ?? '', params: { token } }),
        onError: error => resolve({ message: error.message, closed: closeOf(error) }),
      });
      void failing.sendMessage({ text: 'hello?' });
    }),
};
Object.assign(globalThis, { page });
