/**
 * The session machinery behind a `Client`: one WebSocket at a time, reopened after any close
 * it did not ask for (backoff with full jitter), with the requests and watches that outlive
 * each socket. Internal: use `connect()`.
 */
export class Connection {
    /**
     * Use `connect()`, which also opens the first connection.
     * @param {string} url `ws://HOST:PORT/v1` or `wss://...`
     * @param {ConnectOptions} options
     */
    constructor(url: string, options: ConnectOptions);
    /**
     * Open the first session; rejects if it fails (no retries).
     * @returns {Promise<void>}
     */
    open(): Promise<void>;
    /** The server's latest `welcome`: its features (registered tools) and limits. */
    get welcome(): import("./protocol.js").Welcome | null;
    /** `open`; `reconnecting` after a drop; `offline` after giving up; `closed` after `close()`. */
    get state(): import("./client.js").ConnectionState;
    /** @returns {ClientStatistics} a frozen snapshot */
    statistics(): ClientStatistics;
    /**
     * See `Client.watch`.
     * @param {string} jobId
     * @param {{ afterSeq?: number, epoch?: number | null, signal?: AbortSignal, bufferSize?: number }} [options]
     * @returns {JobWatch}
     */
    watch(jobId: string, options?: {
        afterSeq?: number;
        epoch?: number | null;
        signal?: AbortSignal;
        bufferSize?: number;
    }): JobWatch;
    /**
     * See `Client.onNotification`.
     * @param {(notification: Notification) => void} listener
     * @returns {() => void}
     */
    onNotification(listener: (notification: Notification) => void): () => void;
    /**
     * See `Client.onStateChange`.
     * @param {(state: ConnectionState) => void} listener
     * @returns {() => void}
     */
    onStateChange(listener: (state: ConnectionState) => void): () => void;
    /**
     * See `Client.close`.
     * @returns {Promise<void>}
     */
    close(): Promise<void>;
    nextId(): string;
    /**
     * Send a request and resolve with its reply of type `expect`, or reject with the typed error.
     * @param {{ type: string, id: string } & Record<string, unknown>} message
     * @param {string} expect
     * @param {boolean} retry
     * @param {{ onReply?: (reply: any) => void, timeoutMs?: number, own?: boolean }} [options]
     *   `own`: the client's own request (a subscription, a keep-alive ping), not counted in
     *   `maxPendingRequests`
     * @returns {Promise<any>}
     */
    request(message: {
        type: string;
        id: string;
    } & Record<string, unknown>, expect: string, retry: boolean, { onReply, timeoutMs, own }?: {
        onReply?: (reply: any) => void;
        timeoutMs?: number;
        own?: boolean;
    }): Promise<any>;
    #private;
}
export type Welcome = import("./protocol.js").Welcome;
export type Notification = import("./protocol.js").Notification;
export type JobWatching = import("./protocol.js").JobWatching;
export type ConnectOptions = import("./client.js").ConnectOptions;
export type ConnectionState = import("./client.js").ConnectionState;
export type ClientStatistics = import("./client.js").ClientStatistics;
export type WebSocketLike = import("./client.js").WebSocketLike;
export type WebSocketConstructor = import("./client.js").WebSocketConstructor;
export type Pending = {
    message: {
        type: string;
        id: string;
    } & Record<string, unknown>;
    /**
     * the reply's type
     */
    expect: string;
    /**
     * resent on the next connection if this one drops before the reply
     */
    retry: boolean;
    /**
     * runs as the reply is read, before later frames
     */
    onReply: ((reply: any) => void) | null;
    resolve: (value: any) => void;
    reject: (error: unknown) => void;
    timer: ReturnType<typeof setTimeout> | undefined;
};
/**
 * A socket past `welcome`; `ready` once the requests and watches that waited for it were sent
 * (until then new ones wait too, so that they go out in order).
 */
export type Session = {
    ws: WebSocketLike;
    welcome: Welcome;
    ready: boolean;
};
import { JobWatch } from "./watch.js";
