/**
 * Connect to a backstream server and open a session. Rejects if the first connection fails
 * (`UnauthorizedError` for a bad token, `UnavailableError` when nothing answers); later drops
 * are retried by the client itself.
 * @param {string} url `ws://HOST:PORT/v1` or `wss://...`
 * @param {ConnectOptions} options
 * @returns {Promise<Client>}
 */
export function connect(url: string, options: ConnectOptions): Promise<Client>;
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
    /**
     * Use `connect()`, which also opens the first connection.
     * @param {Connection} connection
     */
    constructor(connection: Connection);
    /** The user the server knows this client as. */
    get user(): string;
    /** The server's latest `welcome`: its features (the registered tools) and limits. */
    get welcome(): import("./protocol.js").Welcome | null;
    /** `open`; `reconnecting` after a drop; `offline` after giving up; `closed` after `close()`. */
    get state(): ConnectionState;
    /** @returns {ClientStatistics} a frozen snapshot */
    statistics(): ClientStatistics;
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
    startJob({ threadId, messageId, model, messages, params, tools, previousJobId, workflow, input }: {
        threadId: string;
        messageId: string;
        model?: string;
        messages?: Array<Record<string, unknown>>;
        params?: Record<string, unknown>;
        tools?: string[];
        previousJobId?: string;
        workflow?: string;
        input?: Record<string, unknown>;
    }): Promise<JobStarted>;
    /**
     * The job's summary; with `includeContent`, its text from character `offset` and its tool calls.
     * @param {string} jobId
     * @param {{ includeContent?: boolean, offset?: number }} [options]
     * @returns {Promise<JobInfo>}
     */
    getJob(jobId: string, { includeContent, offset }?: {
        includeContent?: boolean;
        offset?: number;
    }): Promise<JobInfo>;
    /**
     * Stop a running job; its content so far is kept. `aborted` is false if it had finished.
     * @param {string} jobId
     * @returns {Promise<JobAbortResult>}
     */
    abort(jobId: string): Promise<JobAbortResult>;
    /**
     * The user's jobs, newest first.
     * @param {{ threadId?: string, status?: JobStatus[], limit?: number }} [options]
     * @returns {Promise<JobListResult>}
     */
    listJobs({ threadId, status, limit }?: {
        threadId?: string;
        status?: JobStatus[];
        limit?: number;
    }): Promise<JobListResult>;
    /**
     * Decide on a tool call waiting for approval (`ConflictError` if it is not waiting).
     * @param {string} jobId
     * @param {string} callId
     * @param {boolean} approved
     * @returns {Promise<JobApproveResult>}
     */
    approve(jobId: string, callId: string, approved: boolean): Promise<JobApproveResult>;
    /**
     * Stored notifications, newest first, and the unread count.
     * @param {{ unreadOnly?: boolean, limit?: number }} [options]
     * @returns {Promise<NotificationsResult>}
     */
    listNotifications({ unreadOnly, limit }?: {
        unreadOnly?: boolean;
        limit?: number;
    }): Promise<NotificationsResult>;
    /**
     * Mark notifications read: some `ids`, or `all: true`.
     * @param {{ ids?: string[], all?: boolean }} which
     * @returns {Promise<NotificationsReadResult>}
     */
    markNotificationsRead({ ids, all }: {
        ids?: string[];
        all?: boolean;
    }): Promise<NotificationsReadResult>;
    /**
     * Mute a thread (no notifications for its jobs), or unmute it.
     * @param {string} threadId
     * @param {boolean} [muted]
     * @returns {Promise<ThreadMuteResult>}
     */
    muteThread(threadId: string, muted?: boolean): Promise<ThreadMuteResult>;
    /** @returns {Promise<Pong>} */
    ping(): Promise<Pong>;
    /**
     * Watch a job from `afterSeq` (default 0: from the start). Iterate the result with
     * `for await`. Watching a job this client already watches ends the earlier watch.
     * @param {string} jobId
     * @param {{ afterSeq?: number, epoch?: number | null, signal?: AbortSignal, bufferSize?: number }} [options]
     *   `epoch`: the epoch the cursor belongs to (the watch raises `GoneError` if the log moved on);
     *   `signal`: aborting it ends the watch (a waiting iteration rejects with the signal's reason)
     * @returns {JobWatch}
     */
    watch(jobId: string, options?: {
        afterSeq?: number;
        epoch?: number | null;
        signal?: AbortSignal;
        bufferSize?: number;
    }): JobWatch;
    /**
     * Call `listener` with each notification the server pushes (jobs that ended while nobody
     * watched them, tools waiting for approval). Nothing is buffered for a listener: pushes
     * that arrive while none is registered are only in `listNotifications()`. A listener that
     * throws is reported as an uncaught error; the others still run.
     * @param {(notification: Notification) => void} listener
     * @returns {() => void} removes the listener
     */
    onNotification(listener: (notification: Notification) => void): () => void;
    /**
     * Call `listener` on each change of `state`.
     * @param {(state: ConnectionState) => void} listener
     * @returns {() => void} removes the listener
     */
    onStateChange(listener: (state: ConnectionState) => void): () => void;
    /**
     * Close the connection for good. Waiting requests reject with `ClientClosedError`; watches
     * end (their iterations finish). Resolves once the socket closed (at most 2 s).
     * @returns {Promise<void>}
     */
    close(): Promise<void>;
    #private;
}
/**
 * The part of the WebSocket API the client uses: the browser's `WebSocket`, Node 22's global
 * one and the `ws` package all have it.
 */
export type WebSocketLike = {
    bufferedAmount: number;
    send: (data: string) => void;
    close: (code?: number, reason?: string) => void;
    onopen: any;
    onmessage: any;
    onclose: any;
    onerror: any;
};
export type WebSocketConstructor = new (url: string) => WebSocketLike;
export type ConnectOptions = {
    /**
     * a static token (or a JWT you will not need to refresh)
     */
    token?: string | undefined;
    /**
     * called for
     * the first connection, and again with `refresh: true` when the server refuses the token or
     * ends the session with 4401 (an expired JWT)
     */
    getToken?: ((context: {
        refresh: boolean;
    }) => string | Promise<string>) | undefined;
    /**
     * default `globalThis.WebSocket` (browsers, Node 22);
     * on Node 20 pass the `ws` package's `WebSocket`
     */
    WebSocket?: WebSocketConstructor | undefined;
    /**
     * sent in `hello` (default `backstream-js/0.1.0`)
     */
    clientName?: string | undefined;
    /**
     * a request without a reply by then rejects with
     * `RequestTimeoutError` (default 30000)
     */
    requestTimeoutMs?: number | undefined;
    /**
     * from opening the socket to `welcome` (default 10000)
     */
    connectTimeoutMs?: number | undefined;
    /**
     * first backoff before a reconnect (default 200)
     */
    reconnectBaseMs?: number | undefined;
    /**
     * the backoff doubles up to this (default 10000); each
     * wait is drawn at random between 0 and it (full jitter)
     */
    reconnectMaxMs?: number | undefined;
    /**
     * failed reconnects in a row before the client gives
     * up: watches and waiting requests then fail with `UnavailableError` (default 30)
     */
    maxReconnectAttempts?: number | undefined;
    /**
     * after this long without a frame from the server, send a
     * `ping`; no `pong` within 10 s drops the connection and reconnects (default 25000; 0: off)
     */
    heartbeatMs?: number | undefined;
    /**
     * requests that may wait at once for their reply or
     * for a connection; past it a request rejects at once with `UnavailableError` (default 256)
     */
    maxPendingRequests?: number | undefined;
    /**
     * when the socket holds more unsent bytes, a request
     * rejects at once with `UnavailableError` (default 1 MiB)
     */
    maxBufferedBytes?: number | undefined;
    /**
     * batches a watch keeps for a slow consumer (default 64)
     */
    watchBufferSize?: number | undefined;
};
export type ConnectionState = "connecting" | "open" | "reconnecting" | "offline" | "closed";
export type ClientStatistics = {
    state: ConnectionState;
    /**
     * sessions opened after the first
     */
    reconnects: number;
    /**
     * sent, waiting for their reply
     */
    pendingRequests: number;
    /**
     * waiting for a connection
     */
    queuedRequests: number;
    watches: number;
};
export type JobWatch = import("./watch.js").JobWatch;
export type Welcome = import("./protocol.js").Welcome;
export type Notification = import("./protocol.js").Notification;
export type JobStarted = import("./protocol.js").JobStarted;
export type JobInfo = import("./protocol.js").JobInfo;
export type JobAbortResult = import("./protocol.js").JobAbortResult;
export type JobListResult = import("./protocol.js").JobListResult;
export type JobApproveResult = import("./protocol.js").JobApproveResult;
export type JobStatus = import("./protocol.js").JobStatus;
export type NotificationsResult = import("./protocol.js").NotificationsResult;
export type NotificationsReadResult = import("./protocol.js").NotificationsReadResult;
export type ThreadMuteResult = import("./protocol.js").ThreadMuteResult;
export type Pong = import("./protocol.js").Pong;
import { Connection } from "./connection.js";
