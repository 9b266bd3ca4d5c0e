// @ts-check
// Shared pieces of the tests: a transport on the server under test, and ways to read it.
import { writeFileSync } from 'node:fs';
import WebSocket from 'ws';
import { AbstractChat, WebSocketChatTransport, readUIMessageStream } from 'ai';

/** @typedef {import('ai').UIMessage} UIMessage */
/** @typedef {import('ai').ChatState<UIMessage>} ChatState */
/** @typedef {import('ai').UIMessageChunk} UIMessageChunk */

/** The endpoint under test, e.g. ws://127.0.0.1:8765/v1/ai-sdk (from the pytest driver). */
export const SERVER_URL = requireEnv('BACKSTREAM_AI_SDK_URL');

/** @param {string} name */
function requireEnv(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through pytest (tests/test_ai_sdk.py)`);
  return value;
}

/**
 * A transport for one user. Node 20 has no global WebSocket: the `ws` package's is passed in.
 * @param {string} token
 * @param {object} [body] the request body: {model, params, tools}
 * @param {Record<string, string>} [params] more query parameters of the URL, e.g. coalesce_ms
 * @param {typeof WebSocket} [webSocket] the WebSocket class to use
 * @returns {WebSocketChatTransport<UIMessage>}
 */
export function transportFor(token, body = {}, params = {}, webSocket = WebSocket) {
  return new WebSocketChatTransport({
    url: SERVER_URL,
    params: { token, ...params },
    body,
    // @ts-ignore: ws's constructor is the WebSocket the transport expects
    webSocket,
  });
}

/**
 * A WebSocket class that records every frame its sockets receive, parsed, into `frames`.
 * @param {any[]} frames
 * @returns {typeof WebSocket}
 */
export function recordingWebSocket(frames) {
  class Recording extends WebSocket {
    /**
     * @param {string | URL} url
     * @param {string | string[]} [protocols]
     */
    constructor(url, protocols) {
      super(url, protocols);
      this.on('message', data => frames.push(JSON.parse(String(data))));
    }
  }
  // ws declares a null address too (server side); the transport always gives one.
  return /** @type {typeof WebSocket} */ (/** @type {unknown} */ (Recording));
}

/**
 * @param {string} id
 * @param {string} text
 * @returns {UIMessage}
 */
export function userMessage(id, text) {
  return { id, role: 'user', parts: [{ type: 'text', text }] };
}

/**
 * Send messages and return the response stream.
 * @param {WebSocketChatTransport<UIMessage>} transport
 * @param {string} chatId
 * @param {UIMessage[]} messages
 * @param {AbortSignal} [abortSignal]
 */
export function send(transport, chatId, messages, abortSignal) {
  return transport.sendMessages({
    chatId,
    messages,
    trigger: 'submit-message',
    messageId: undefined,
    abortSignal,
  });
}

/**
 * Split a stream of chunks: one copy is recorded into `seen`, the other returned.
 * @param {ReadableStream<UIMessageChunk>} stream
 * @param {UIMessageChunk[]} seen
 * @returns {ReadableStream<UIMessageChunk>}
 */
export function recording(stream, seen) {
  return stream.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        seen.push(chunk);
        controller.enqueue(chunk);
      },
    }),
  );
}

/**
 * The assembled message once the stream ends (readUIMessageStream yields each state).
 * @param {ReadableStream<UIMessageChunk>} stream
 * @returns {Promise<UIMessage | undefined>}
 */
export async function finalMessage(stream) {
  /** @type {UIMessage | undefined} */
  let last;
  for await (const message of readUIMessageStream({ stream })) last = message;
  return last;
}

/**
 * The text of a message's text parts, joined.
 * @param {UIMessage | undefined} message
 */
export function textOf(message) {
  return (message?.parts ?? [])
    .map(part => (part.type === 'text' ? part.text : ''))
    .join('');
}

/**
 * Hand results to the pytest driver, which checks them against the server's own view.
 * @param {object} result
 */
export function report(result) {
  writeFileSync(requireEnv('BACKSTREAM_RESULT_FILE'), JSON.stringify(result));
}

/**
 * Resolve once `predicate` holds, checking every 20 ms (fails after `timeoutMs`).
 * @param {() => boolean} predicate
 * @param {string} what
 * @param {number} [timeoutMs]
 */
export async function until(predicate, what, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise(resolve => setTimeout(resolve, 20));
  }
}

/**
 * The chat state a UI framework would keep (what @ai-sdk/react's useChat holds), in plain JS.
 * @implements {ChatState}
 */
class PlainChatState {
  /** @param {UIMessage[]} messages */
  constructor(messages = []) {
    /** @type {import('ai').ChatStatus} */
    this.status = 'ready';
    /** @type {Error | undefined} */
    this.error = undefined;
    this.messages = messages;
  }
  /** @param {UIMessage} message */
  pushMessage(message) {
    this.messages = this.messages.concat(message);
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  /** @param {number} index @param {UIMessage} message */
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  }
  /** @template T @param {T} thing @returns {T} */
  snapshot(thing) {
    return structuredClone(thing);
  }
}

/**
 * A Chat as useChat drives it, without React.
 * @extends {AbstractChat<UIMessage>}
 */
export class PlainChat extends AbstractChat {
  /** @param {Omit<import('ai').ChatInit<UIMessage>, 'messages'> & {messages?: UIMessage[]}} init */
  constructor({ messages, ...init }) {
    super({ ...init, state: new PlainChatState(messages) });
  }
}
