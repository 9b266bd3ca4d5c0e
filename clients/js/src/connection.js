// One logical connection to a backstream server: sessions, requests, pushes, reconnects.

import {
  ClientClosedError,
  ConnectionLostError,
  ProtocolError,
  RequestTimeoutError,
  TooLargeError,
  UnauthorizedError,
  UnavailableError,
  UnsupportedProtocolError,
  errorFromMessage,
} from "./errors.js";
import { Backoff } from "./backoff.js";
import { PROTOCOL_VERSION } from "./protocol.js";
import { JobWatch } from "./watch.js";

/** @typedef {import("./protocol.js").Welcome} Welcome */
/** @typedef {import("./protocol.js").Notification} Notification */
/** @typedef {import("./protocol.js").JobWatching} JobWatching */

/** @typedef {import("./client.js").ConnectOptions} ConnectOptions */
/** @typedef {import("./client.js").ConnectionState} ConnectionState */
/** @typedef {import("./client.js").ClientStatistics} ClientStatistics */
/** @typedef {import("./client.js").WebSocketLike} WebSocketLike */
/** @typedef {import("./client.js").WebSocketConstructor} WebSocketConstructor */

/**
 * @typedef {object} Pending
 * @property {{ type: string, id: string } & Record<string, unknown>} message
 * @property {string} expect the reply's type
 * @property {boolean} retry resent on the next connection if this one drops before the reply
 * @property {((reply: any) => void) | null} onReply runs as the reply is read, before later frames
 * @property {(value: any) => void} resolve
 * @property {(error: unknown) => void} reject
 * @property {ReturnType<typeof setTimeout> | undefined} timer
 */

/**
 * A socket past `welcome`; `ready` once the requests and watches that waited for it were sent
 * (until then new ones wait too, so that they go out in order).
 * @typedef {{ ws: WebSocketLike, welcome: Welcome, ready: boolean }} Session
 */

const CLIENT_NAME = "backstream-js/0.1.0";
const PING_TIMEOUT_MS = 10_000;
const QUICK_DROP_MS = 5_000;

/**
 * The session machinery behind a `Client`: one WebSocket at a time, reopened after any close
 * it did not ask for (backoff with full jitter), with the requests and watches that outlive
 * each socket. Internal: use `connect()`.
 */
export class Connection {
  #url;
  /** @type {Required<Omit<ConnectOptions, "token" | "getToken" | "WebSocket">>} */
  #options;
  /** @type {string | undefined} */
  #staticToken;
  /** @type {ConnectOptions["getToken"]} */
  #getToken;
  /** @type {WebSocketConstructor} */
  #WebSocket;
  /** @type {Session | null} */
  #session = null;
  /** @type {Welcome | null} */
  #welcome = null;
  /** @type {ConnectionState} */
  #state = "connecting";
  #ids = 0;
  #reconnects = 0;
  #everOpen = false;
  /** @type {Map<string, Pending>} */
  #pending = new Map();
  /** @type {Pending[]} */
  #queued = [];
  /** @type {Map<string, JobWatch>} */
  #watches = new Map();
  /** @type {Set<(notification: Notification) => void>} */
  #notificationListeners = new Set();
  /** @type {Set<(state: ConnectionState) => void>} */
  #stateListeners = new Set();
  /** @type {string | null} */
  #token = null;
  #refreshToken = false;
  #tokenRefreshed = false;
  /** @type {Promise<unknown> | null} */
  #connecting = null;
  /** @type {Backoff} */
  #backoff;
  /** @type {any} */
  #heartbeat = null;
  #lastReceived = 0;
  #pinging = false;
  #openedAt = 0;
  #quickDrops = 0;
  #onOnline = () => {
    if (this.#state === "offline") this.#ensureConnecting();
    else this.#backoff.wake();
  };
  /** @type {import("./watch.js").WatchHost} */
  #host = {
    subscribe: (watch) => {
      if (this.#session?.ready && this.#watches.get(watch.jobId) === watch) this.#subscribe(watch);
    },
    unsubscribe: (watch) => this.#sendUnwatch(watch.jobId),
    release: (watch, unwatch) => {
      if (this.#watches.get(watch.jobId) !== watch) return;
      this.#watches.delete(watch.jobId);
      if (unwatch) this.#sendUnwatch(watch.jobId);
    },
  };

  /**
   * Use `connect()`, which also opens the first connection.
   * @param {string} url `ws://HOST:PORT/v1` or `wss://...`
   * @param {ConnectOptions} options
   */
  constructor(url, options) {
    if (!/^wss?:\/\//.test(url)) throw new TypeError(`expected a ws:// or wss:// URL, got ${JSON.stringify(url)}`);
    if (options.token === undefined && options.getToken === undefined) {
      throw new TypeError("give options.token or options.getToken");
    }
    const WebSocketClass = options.WebSocket ?? /** @type {any} */ (globalThis).WebSocket;
    if (typeof WebSocketClass !== "function") {
      throw new TypeError("no global WebSocket here: pass options.WebSocket (e.g. the ws package on Node 20)");
    }
    this.#url = url;
    this.#WebSocket = WebSocketClass;
    this.#staticToken = options.token;
    this.#getToken = options.getToken;
    this.#options = {
      clientName: options.clientName ?? CLIENT_NAME,
      requestTimeoutMs: options.requestTimeoutMs ?? 30_000,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      reconnectBaseMs: options.reconnectBaseMs ?? 200,
      reconnectMaxMs: options.reconnectMaxMs ?? 10_000,
      maxReconnectAttempts: options.maxReconnectAttempts ?? 30,
      heartbeatMs: options.heartbeatMs ?? 25_000,
      maxPendingRequests: options.maxPendingRequests ?? 256,
      maxBufferedBytes: options.maxBufferedBytes ?? 1024 * 1024,
      watchBufferSize: options.watchBufferSize ?? 64,
    };
    this.#backoff = new Backoff(this.#options.reconnectBaseMs, this.#options.reconnectMaxMs);
  }

  /**
   * Open the first session; rejects if it fails (no retries).
   * @returns {Promise<void>}
   */
  async open() {
    const failure = await this.#connectLoop(true);
    if (failure !== null) {
      this.#setState("closed");
      throw failure;
    }
    /** @type {any} */ (globalThis).addEventListener?.("online", this.#onOnline);
  }

  /** The server's latest `welcome`: its features (registered tools) and limits. */
  get welcome() {
    return this.#welcome;
  }

  /** `open`; `reconnecting` after a drop; `offline` after giving up; `closed` after `close()`. */
  get state() {
    return this.#state;
  }

  /** @returns {ClientStatistics} a frozen snapshot */
  statistics() {
    return Object.freeze({
      state: this.#state,
      reconnects: this.#reconnects,
      pendingRequests: this.#pending.size,
      queuedRequests: this.#queued.length,
      watches: this.#watches.size,
    });
  }

  /**
   * See `Client.watch`.
   * @param {string} jobId
   * @param {{ afterSeq?: number, epoch?: number | null, signal?: AbortSignal, bufferSize?: number }} [options]
   * @returns {JobWatch}
   */
  watch(jobId, options = {}) {
    if (this.#state === "closed") throw new ClientClosedError("the client is closed");
    this.#watches.get(jobId)?.close();
    const watch = new JobWatch(this.#host, jobId, {
      bufferSize: this.#options.watchBufferSize,
      ...options,
    });
    if (watch.ended) return watch;
    this.#watches.set(jobId, watch);
    if (this.#session?.ready) this.#subscribe(watch);
    else this.#ensureConnecting();
    return watch;
  }
  /**
   * See `Client.onNotification`.
   * @param {(notification: Notification) => void} listener
   * @returns {() => void}
   */
  onNotification(listener) {
    this.#notificationListeners.add(listener);
    return () => this.#notificationListeners.delete(listener);
  }
  /**
   * See `Client.onStateChange`.
   * @param {(state: ConnectionState) => void} listener
   * @returns {() => void}
   */
  onStateChange(listener) {
    this.#stateListeners.add(listener);
    return () => this.#stateListeners.delete(listener);
  }
  /**
   * See `Client.close`.
   * @returns {Promise<void>}
   */
  close() {
    if (this.#state === "closed") return Promise.resolve();
    this.#setState("closed");
    this.#backoff.wake();
    this.#stopHeartbeat();
    /** @type {any} */ (globalThis).removeEventListener?.("online", this.#onOnline);
    const error = new ClientClosedError("the client was closed");
    for (const pending of [...this.#pending.values(), ...this.#queued.splice(0)]) this.#settle(pending, error);
    this.#pending.clear();
    for (const watch of [...this.#watches.values()]) watch.close();
    const session = this.#session;
    this.#session = null;
    if (session === null) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, 2000);
      session.ws.onclose = () => {
        clearTimeout(timer);
        resolve();
      };
      session.ws.onmessage = null;
      try {
        session.ws.close(1000, "client closed");
      } catch {
        clearTimeout(timer);
        resolve();
      }
    });
  }

  // -- sending and receiving ------------------------------------------------------------------

  nextId() {
    this.#ids += 1;
    return `r${this.#ids}`;
  }

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
  request(message, expect, retry, { onReply, timeoutMs = this.#options.requestTimeoutMs, own = false } = {}) {
    if (this.#state === "closed") return Promise.reject(new ClientClosedError("the client is closed"));
    const waiting = this.#pending.size + this.#queued.length;
    if (!own && waiting >= this.#options.maxPendingRequests) {
      return Promise.reject(new UnavailableError(`${waiting} requests already wait for a reply or a connection; try again later`));
    }
    return new Promise((resolve, reject) => {
      /** @type {Pending} */
      const pending = { message, expect, retry, onReply: onReply ?? null, resolve, reject, timer: undefined };
      pending.timer = setTimeout(() => {
        this.#pending.delete(message.id);
        const at = this.#queued.indexOf(pending);
        if (at >= 0) this.#queued.splice(at, 1);
        reject(new RequestTimeoutError(`no reply to ${message.type} within ${timeoutMs} ms`));
      }, timeoutMs);
      if (this.#session?.ready || (own && this.#session !== null)) {
        this.#send(pending);
      } else {
        this.#queued.push(pending);
        this.#ensureConnecting();
      }
    });
  }

  /** @param {Pending} pending */
  #send(pending) {
    const session = /** @type {Session} */ (this.#session);
    if (session.ws.bufferedAmount > this.#options.maxBufferedBytes) {
      this.#settle(pending, new UnavailableError("the socket's send buffer is full; try again later"));
      return;
    }
    const text = JSON.stringify(pending.message);
    const limit = session.welcome.limits.max_message_bytes;
    // The server would close the connection (1009) for a frame over its limit: refuse it here.
    if (typeof limit === "number" && text.length * 3 > limit && new TextEncoder().encode(text).length > limit) {
      this.#settle(pending, new TooLargeError(`the request is larger than the server's limit of ${limit} bytes`));
      return;
    }
    this.#pending.set(pending.message.id, pending);
    try {
      session.ws.send(text);
    } catch (error) {
      this.#pending.delete(pending.message.id);
      this.#settle(pending, new ConnectionLostError("the connection closed before the request was sent", { cause: error }));
    }
  }

  /**
   * Reject `pending` with `error` and forget its timer.
   * @param {Pending} pending
   * @param {unknown} error
   */
  #settle(pending, error) {
    clearTimeout(pending.timer);
    pending.reject(error);
  }

  /**
   * @param {Session} session
   * @param {unknown} data
   */
  #dispatch(session, data) {
    if (session !== this.#session) return;
    this.#lastReceived = Date.now();
    /** @type {any} */
    let message;
    try {
      message = JSON.parse(String(data));
    } catch {
      message = null;
    }
    if (message === null || typeof message !== "object" || typeof message.type !== "string") {
      this.#abandon(session, "unreadable message from the server");
      return;
    }
    if (message.type === "job.events") {
      this.#watches.get(message.job_id)?._deliver(message);
    } else if (message.type === "notification") {
      for (const listener of [...this.#notificationListeners]) {
        try {
          listener(message.notification);
        } catch (error) {
          queueMicrotask(() => {
            throw error;
          });
        }
      }
    } else if (typeof message.id === "string" && this.#pending.has(message.id)) {
      const pending = /** @type {Pending} */ (this.#pending.get(message.id));
      this.#pending.delete(message.id);
      clearTimeout(pending.timer);
      if (message.type === "error") {
        pending.reject(errorFromMessage(message));
      } else if (message.type !== pending.expect) {
        pending.reject(new ProtocolError(`expected ${pending.expect}, got ${message.type}`));
      } else {
        pending.onReply?.(message);
        pending.resolve(message);
      }
    } else if (message.type === "error" && message.id === null) {
      // A watch that ended on the server's side: job_id names it.
      if (typeof message.job_id === "string") this.#watches.get(message.job_id)?._fail(errorFromMessage(message));
    }
  }

  /** @param {JobWatch} watch */
  #subscribe(watch) {
    const id = this.nextId();
    watch._subscribing(id);
    const message = {
      type: "job.watch",
      id,
      job_id: watch.jobId,
      after_seq: watch.resumeSeq,
      epoch: watch.epoch ?? undefined,
    };
    const session = this.#session;
    /** @param {JobWatching} reply */
    const onReply = (reply) => {
      if (this.#watches.get(watch.jobId) === watch) watch._watching(reply.job, reply.id);
      else if (!this.#watches.has(watch.jobId)) this.#sendUnwatch(watch.jobId); // closed meanwhile
    };
    this.request(message, "job.watching", false, { onReply, own: true }).catch((error) => {
      if (error instanceof ConnectionLostError || error instanceof ClientClosedError) return; // resubscribes on the next connection
      if (error instanceof RequestTimeoutError) {
        if (session !== null && this.#session === session) this.#abandon(session, "a watch got no reply");
        return;
      }
      if (this.#watches.get(watch.jobId) === watch) watch._fail(error);
    });
  }

  /** @param {string} jobId */
  #sendUnwatch(jobId) {
    if (this.#session === null || this.#state === "closed") return;
    this.request({ type: "job.unwatch", id: this.nextId(), job_id: jobId }, "job.unwatched", false, { own: true }).catch(() => {
      // Nothing to do: a connection that dropped took the watch with it.
    });
  }

  // -- connecting ---------------------------------------------------------------------------

  #ensureConnecting() {
    if (this.#connecting !== null || this.#state === "closed" || this.#session !== null) return;
    this.#connecting = this.#connectLoop(false).then((failure) => {
      this.#connecting = null;
      if (failure !== null) this.#giveUp(failure);
    });
  }

  /**
   * Connect, retrying with backoff (the first connection does not retry). Resolves with the
   * error that ended the attempts, or null once a session is open.
   * @param {boolean} first
   * @returns {Promise<Error | null>}
   */
  async #connectLoop(first) {
    this.#setState(first ? "connecting" : "reconnecting");
    const retries = first ? 0 : this.#options.maxReconnectAttempts;
    let failures = 0;
    // Sessions that keep closing right after they open back off too.
    if (this.#quickDrops > 1) await this.#backoff.wait(this.#quickDrops - 1);
    for (;;) {
      if (this.#isClosed()) return new ClientClosedError("the client was closed");
      try {
        const session = await this.#openSession();
        if (this.#session === session) {
          this.#sessionReady(session);
          return null;
        }
        throw new ConnectionLostError("the connection closed right after welcome");
      } catch (caught) {
        const error = caught instanceof Error ? caught : new UnavailableError(String(caught));
        if (this.#isClosed()) return new ClientClosedError("the client was closed");
        if (error instanceof UnauthorizedError && this.#getToken !== undefined && !this.#tokenRefreshed) {
          this.#refreshToken = true; // the token we had may have expired meanwhile: ask for a new one
          continue;
        }
        if (error instanceof UnauthorizedError || error instanceof UnsupportedProtocolError) return error;
        failures += 1;
        if (failures > retries) {
          return first ? error : new UnavailableError(
            `could not reconnect after ${failures} attempts: ${error.message}`, { cause: error },
          );
        }
        await this.#backoff.wait(failures);
      }
    }
  }

  async #currentToken() {
    if (this.#getToken === undefined) return /** @type {string} */ (this.#staticToken);
    if (this.#token === null || this.#refreshToken) {
      const refresh = this.#refreshToken;
      this.#token = await this.#getToken({ refresh });
      this.#refreshToken = false;
      this.#tokenRefreshed = refresh;
    } else {
      this.#tokenRefreshed = false;
    }
    return this.#token;
  }

  /**
   * Open a socket, say hello, and make it the session once `welcome` arrives (handlers switch
   * in the same turn, so no frame after `welcome` is missed).
   * @returns {Promise<Session>}
   */
  async #openSession() {
    const token = await this.#currentToken();
    const ws = new this.#WebSocket(this.#url);
    return new Promise((resolve, reject) => {
      const fail = (/** @type {Error} */ error) => {
        clearTimeout(timer);
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        try {
          ws.close();
        } catch {
          // already closed
        }
        reject(error);
      };
      const timer = setTimeout(
        () => fail(new UnavailableError(`no welcome within ${this.#options.connectTimeoutMs} ms`)),
        this.#options.connectTimeoutMs,
      );
      ws.onerror = () => {}; // a close event follows with the code
      ws.onclose = (/** @type {{ code: number, reason: string }} */ event) => {
        fail(new UnavailableError(`the connection closed during the handshake (${event.code} ${event.reason || ""})`.trim()));
      };
      ws.onopen = () => {
        ws.send(JSON.stringify({ type: "hello", id: "hello", protocol: PROTOCOL_VERSION, token, client: this.#options.clientName }));
      };
      ws.onmessage = (/** @type {{ data: unknown }} */ event) => {
        /** @type {any} */
        let reply = null;
        try {
          reply = JSON.parse(String(event.data));
        } catch {
          // handled below
        }
        if (reply?.type === "error") return fail(errorFromMessage(reply));
        if (reply?.type !== "welcome") return fail(new ProtocolError(`expected welcome, got ${String(event.data).slice(0, 80)}`));
        if (this.#isClosed()) return fail(new ClientClosedError("the client was closed"));
        clearTimeout(timer);
        /** @type {Session} */
        const session = { ws, welcome: reply, ready: false };
        ws.onmessage = (/** @type {{ data: unknown }} */ next) => this.#dispatch(session, next.data);
        ws.onclose = (/** @type {{ code: number, reason: string }} */ closed) => this.#sessionClosed(session, closed.code, closed.reason);
        this.#session = session;
        this.#welcome = reply;
        this.#lastReceived = Date.now();
        resolve(session);
      };
    });
  }

  /** @param {Session} session */
  #sessionReady(session) {
    session.ready = true;
    if (this.#everOpen) this.#reconnects += 1;
    this.#everOpen = true;
    this.#openedAt = Date.now();
    this.#setState("open");
    this.#startHeartbeat(session);
    for (const pending of this.#queued.splice(0)) this.#send(pending);
    for (const watch of this.#watches.values()) if (watch.wantsBatches) this.#subscribe(watch);
  }

  /**
   * @param {Session} session
   * @param {number} code
   * @param {string} reason
   */
  #sessionClosed(session, code, reason) {
    if (session !== this.#session) return;
    this.#session = null;
    this.#quickDrops = Date.now() - this.#openedAt < QUICK_DROP_MS ? this.#quickDrops + 1 : 0;
    this.#stopHeartbeat();
    for (const watch of this.#watches.values()) watch._paused();
    const lost = new ConnectionLostError(`the connection closed before the reply (${code} ${reason || ""})`.trim());
    for (const pending of this.#pending.values()) {
      if (pending.retry) this.#queued.push(pending);
      else this.#settle(pending, lost);
    }
    this.#pending.clear();
    if (this.#state === "closed") return;
    if (code === 4401) this.#refreshToken = true; // the session expired: a new token first
    if (code === 4400) {
      this.#giveUp(new UnsupportedProtocolError(`the server closed the connection: ${reason || "unsupported protocol"}`));
      return;
    }
    this.#ensureConnecting();
  }

  /**
   * Drop a session that misbehaves (unreadable frames, no pong) and reconnect.
   * @param {Session} session
   * @param {string} reason
   */
  #abandon(session, reason) {
    session.ws.onmessage = session.ws.onclose = null;
    try {
      session.ws.close(4000, reason);
    } catch {
      // already closed
    }
    this.#sessionClosed(session, 1006, reason);
  }

  /**
   * Stop trying: waiting requests and watches fail with `error`. A later request or watch
   * tries again.
   * @param {Error} error
   */
  #giveUp(error) {
    if (this.#state === "closed") return;
    this.#setState("offline");
    for (const pending of this.#queued.splice(0)) this.#settle(pending, error);
    for (const watch of [...this.#watches.values()]) watch._fail(error);
  }

  /** @param {Session} session */
  #startHeartbeat(session) {
    const every = this.#options.heartbeatMs;
    if (!every) return;
    this.#heartbeat = setInterval(() => {
      if (this.#session !== session || this.#pinging || Date.now() - this.#lastReceived < every) return;
      this.#pinging = true;
      this.request({ type: "ping", id: this.nextId() }, "pong", false, { timeoutMs: PING_TIMEOUT_MS, own: true })
        .catch((error) => {
          if (error instanceof RequestTimeoutError && this.#session === session) this.#abandon(session, "no pong");
        })
        .finally(() => {
          this.#pinging = false;
        });
    }, every);
    this.#heartbeat.unref?.(); // Node: the socket, not the heartbeat, keeps a process alive
  }

  #stopHeartbeat() {
    clearInterval(this.#heartbeat);
    this.#heartbeat = null;
  }

  /** A method, so that type narrowing does not outlive an await. */
  #isClosed() {
    return this.#state === "closed";
  }

  /** @param {ConnectionState} state */
  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    for (const listener of [...this.#stateListeners]) {
      try {
        listener(state);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}
