// The public API: one method per protocol request, camelCase in, wire messages out.

import { Connection } from "./connection.js";

/**
 * The part of the WebSocket API the client uses: the browser's `WebSocket`, Node 22's global
 * one and the `ws` package all have it.
 * @typedef {object} WebSocketLike
 * @property {number} bufferedAmount
 * @property {(data: string) => void} send
 * @property {(code?: number, reason?: string) => void} close
 * @property {any} onopen
 * @property {any} onmessage
 * @property {any} onclose
 * @property {any} onerror
 */
/** @typedef {new (url: string) => WebSocketLike} WebSocketConstructor */

/**
 * @typedef {object} ConnectOptions
 * @property {string} [token] a static token (or a JWT you will not need to refresh)
 * @property {(context: { refresh: boolean }) => string | Promise<string>} [getToken] called for
 *   the first connection, and again with `refresh: true` when the server refuses the token or
 *   ends the session with 4401 (an expired JWT)
 * @property {WebSocketConstructor} [WebSocket] default `globalThis.WebSocket` (browsers, Node 22);
 *   on Node 20 pass the `ws` package's `WebSocket`
 * @property {string} [clientName] sent in `hello` (default `backstream-js/0.1.0`)
 * @property {number} [requestTimeoutMs] a request without a reply by then rejects with
 *   `RequestTimeoutError` (default 30000)
 * @property {number} [connectTimeoutMs] from opening the socket to `welcome` (default 10000)
 * @property {number} [reconnectBaseMs] first backoff before a reconnect (default 200)
 * @property {number} [reconnectMaxMs] the backoff doubles up to this (default 10000); each
 *   wait is drawn at random between 0 and it (full jitter)
 * @property {number} [maxReconnectAttempts] failed reconnects in a row before the client gives
 *   up: watches and waiting requests then fail with `UnavailableError` (default 30)
 * @property {number} [heartbeatMs] after this long without a frame from the server, send a
 *   `ping`; no `pong` within 10 s drops the connection and reconnects (default 25000; 0: off)
 * @property {number} [maxPendingRequests] requests that may wait at once for their reply or
 *   for a connection; past it a request rejects at once with `UnavailableError` (default 256)
 * @property {number} [maxBufferedBytes] when the socket holds more unsent bytes, a request
 *   rejects at once with `UnavailableError` (default 1 MiB)
 * @property {number} [watchBufferSize] batches a watch keeps for a slow consumer (default 64)
 */

/** @typedef {"connecting" | "open" | "reconnecting" | "offline" | "closed"} ConnectionState */

/**
 * @typedef {object} ClientStatistics
 * @property {ConnectionState} state
 * @property {number} reconnects sessions opened after the first
 * @property {number} pendingRequests sent, waiting for their reply
 * @property {number} queuedRequests waiting for a connection
 * @property {number} watches
 */

/** @typedef {import("./watch.js").JobWatch} JobWatch */
/** @typedef {import("./protocol.js").Welcome} Welcome */
/** @typedef {import("./protocol.js").Notification} Notification */
/** @typedef {import("./protocol.js").JobStarted} JobStarted */
/** @typedef {import("./protocol.js").JobInfo} JobInfo */
/** @typedef {import("./protocol.js").JobAbortResult} JobAbortResult */
/** @typedef {import("./protocol.js").JobListResult} JobListResult */
/** @typedef {import("./protocol.js").JobApproveResult} JobApproveResult */
/** @typedef {import("./protocol.js").JobStatus} JobStatus */
/** @typedef {import("./protocol.js").NotificationsResult} NotificationsResult */
/** @typedef {import("./protocol.js").NotificationsReadResult} NotificationsReadResult */
/** @typedef {import("./protocol.js").ThreadMuteResult} ThreadMuteResult */
/** @typedef {import("./protocol.js").Pong} Pong */

/**
 * A connection to a backstream server. Make one with `connect()`.
 *
 * Requests reject with the typed errors of `errors.js`. Requests that are safe to repeat
 * (`startJob`, which the server deduplicates by `messageId`, `getJob`, `listJobs`,
 * `listNotifications`, `markNotificationsRead`, `muteThread`, `ping`) are sent again on the
 * next connection if the connection drops before their reply; `abort` and `approve` reject
 * with `ConnectionLostError` instead (they may or may not have been done). Every request
 * rejects with `RequestTimeoutError` after `requestTimeoutMs`, wherever it is.
 */
export class Client {
  #connection;

  /**
   * Use `connect()`, which also opens the first connection.
   * @param {Connection} connection
   */
  constructor(connection) {
    this.#connection = connection;
  }

  /** The user the server knows this client as. */
  get user() {
    return this.#connection.welcome?.user ?? "";
  }

  /** The server's latest `welcome`: its features (the registered tools) and limits. */
  get welcome() {
    return this.#connection.welcome;
  }

  /** `open`; `reconnecting` after a drop; `offline` after giving up; `closed` after `close()`. */
  get state() {
    return this.#connection.state;
  }

  /** @returns {ClientStatistics} a frozen snapshot */
  statistics() {
    return this.#connection.statistics();
  }

  // -- requests -----------------------------------------------------------------------------

  /**
   * Start a job, or get the user's job already started with `messageId` (`existing: true`):
   * a `model` with `messages`, or a `workflow` with its `input` (docs/workflows.md).
   * With `previousJobId` (an ended job of the same thread) the job continues that job's
   * conversation, which the server keeps: `messages` hold only what is new.
   * @param {{ threadId: string, messageId: string, model?: string,
   *   messages?: Array<Record<string, unknown>>, params?: Record<string, unknown>, tools?: string[],
   *   previousJobId?: string, workflow?: string, input?: Record<string, unknown> }} request
   * @returns {Promise<JobStarted>}
   */
  startJob({ threadId, messageId, model, messages, params, tools, previousJobId, workflow, input }) {
    /** @type {{ type: string, id: string } & Record<string, unknown>} */
    const message = {
      type: "job.start",
      id: this.#connection.nextId(),
      thread_id: threadId,
      message_id: messageId,
      params: params ?? {},
      tools: tools ?? [],
      ...(previousJobId ? { previous_job_id: previousJobId } : {}),
    };
    if (workflow !== undefined) Object.assign(message, { workflow, input: input ?? {} });
    else Object.assign(message, { model, messages });
    return this.#connection.request(message, "job.started", true);
  }



  /**
   * The job's summary; with `includeContent`, its text from character `offset` and its tool calls.
   * @param {string} jobId
   * @param {{ includeContent?: boolean, offset?: number }} [options]
   * @returns {Promise<JobInfo>}
   */
  getJob(jobId, { includeContent = false, offset = 0 } = {}) {
    return this.#connection.request(
      { type: "job.get", id: this.#connection.nextId(), job_id: jobId, include_content: includeContent, offset },
      "job.info",
      true,
    );
  }

  /**
   * Stop a running job; its content so far is kept. `aborted` is false if it had finished.
   * @param {string} jobId
   * @returns {Promise<JobAbortResult>}
   */
  abort(jobId) {
    return this.#connection.request({ type: "job.abort", id: this.#connection.nextId(), job_id: jobId }, "job.abort.result", false);
  }

  /**
   * The user's jobs, newest first.
   * @param {{ threadId?: string, status?: JobStatus[], limit?: number }} [options]
   * @returns {Promise<JobListResult>}
   */
  listJobs({ threadId, status, limit } = {}) {
    return this.#connection.request(
      { type: "job.list", id: this.#connection.nextId(), thread_id: threadId, status, limit },
      "job.list.result",
      true,
    );
  }

  /**
   * Decide on a tool call waiting for approval (`ConflictError` if it is not waiting).
   * @param {string} jobId
   * @param {string} callId
   * @param {boolean} approved
   * @returns {Promise<JobApproveResult>}
   */
  approve(jobId, callId, approved) {
    return this.#connection.request(
      { type: "job.approve", id: this.#connection.nextId(), job_id: jobId, call_id: callId, approved },
      "job.approve.result",
      false,
    );
  }

  /**
   * Stored notifications, newest first, and the unread count.
   * @param {{ unreadOnly?: boolean, limit?: number }} [options]
   * @returns {Promise<NotificationsResult>}
   */
  listNotifications({ unreadOnly = false, limit } = {}) {
    return this.#connection.request(
      { type: "notifications.list", id: this.#connection.nextId(), unread_only: unreadOnly, limit },
      "notifications.result",
      true,
    );
  }

  /**
   * Mark notifications read: some `ids`, or `all: true`.
   * @param {{ ids?: string[], all?: boolean }} which
   * @returns {Promise<NotificationsReadResult>}
   */
  markNotificationsRead({ ids = [], all = false }) {
    return this.#connection.request(
      { type: "notifications.read", id: this.#connection.nextId(), ids, all },
      "notifications.read.result",
      true,
    );
  }

  /**
   * Mute a thread (no notifications for its jobs), or unmute it.
   * @param {string} threadId
   * @param {boolean} [muted]
   * @returns {Promise<ThreadMuteResult>}
   */
  muteThread(threadId, muted = true) {
    return this.#connection.request(
      { type: "thread.mute", id: this.#connection.nextId(), thread_id: threadId, muted },
      "thread.mute.result",
      true,
    );
  }

  /** @returns {Promise<Pong>} */
  ping() {
    return this.#connection.request({ type: "ping", id: this.#connection.nextId() }, "pong", true);
  }

  /**
   * Watch a job from `afterSeq` (default 0: from the start). Iterate the result with
   * `for await`. Watching a job this client already watches ends the earlier watch.
   * @param {string} jobId
   * @param {{ afterSeq?: number, epoch?: number | null, signal?: AbortSignal, bufferSize?: number }} [options]
   *   `epoch`: the epoch the cursor belongs to (the watch raises `GoneError` if the log moved on);
   *   `signal`: aborting it ends the watch (a waiting iteration rejects with the signal's reason)
   * @returns {JobWatch}
   */
  watch(jobId, options = {}) {
    return this.#connection.watch(jobId, options);
  }

  /**
   * Call `listener` with each notification the server pushes (jobs that ended while nobody
   * watched them, tools waiting for approval). Nothing is buffered for a listener: pushes
   * that arrive while none is registered are only in `listNotifications()`. A listener that
   * throws is reported as an uncaught error; the others still run.
   * @param {(notification: Notification) => void} listener
   * @returns {() => void} removes the listener
   */
  onNotification(listener) {
    return this.#connection.onNotification(listener);
  }

  /**
   * Call `listener` on each change of `state`.
   * @param {(state: ConnectionState) => void} listener
   * @returns {() => void} removes the listener
   */
  onStateChange(listener) {
    return this.#connection.onStateChange(listener);
  }

  /**
   * Close the connection for good. Waiting requests reject with `ClientClosedError`; watches
   * end (their iterations finish). Resolves once the socket closed (at most 2 s).
   * @returns {Promise<void>}
   */
  close() {
    return this.#connection.close();
  }
}

/**
 * Connect to a backstream server and open a session. Rejects if the first connection fails
 * (`UnauthorizedError` for a bad token, `UnavailableError` when nothing answers); later drops
 * are retried by the client itself.
 * @param {string} url `ws://HOST:PORT/v1` or `wss://...`
 * @param {ConnectOptions} options
 * @returns {Promise<Client>}
 */
export async function connect(url, options) {
  const connection = new Connection(url, options);
  await connection.open();
  return new Client(connection);
}
