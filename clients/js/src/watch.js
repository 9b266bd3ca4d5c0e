// A watch of one job: an async iterator of `job.events` batches that survives reconnects.

import { GoneError, ProtocolError } from "./errors.js";
import { terminalEvent } from "./protocol.js";

/** @typedef {import("./protocol.js").JobEventsMessage} JobEventsMessage */
/** @typedef {import("./protocol.js").JobSummary} JobSummary */

/**
 * What a watch needs from its client.
 * @typedef {object} WatchHost
 * @property {(watch: JobWatch) => void} subscribe send `job.watch` from `watch.resumeSeq` when a session is open
 * @property {(watch: JobWatch) => void} unsubscribe send `job.unwatch`, keeping the watch for a later subscribe
 * @property {(watch: JobWatch, unwatch: boolean) => void} release forget the watch; send `job.unwatch` if asked
 */

/**
 * Batches of one job, in order, from a cursor. Iterate it with `for await`; leaving the loop
 * (break, return, throw) ends the watch. After a close the client did not ask for, the client
 * reconnects and the watch resumes from the last `seq` it received, so the batches join into the
 * job's content with no gap and no repeat. The iteration ends after the batch that holds the
 * job's terminal status.
 *
 * Memory is bounded: at most `bufferSize` batches wait for the consumer. When the buffer is
 * full the watch unsubscribes (`job.unwatch`) and drops what still arrives; once the consumer
 * has read half of the buffer it subscribes again from the last batch it kept. The server keeps
 * the log, so a slow consumer loses nothing: it only receives later.
 *
 * Errors are thrown from the iteration: `GoneError` when the log moved to another epoch (the
 * server recovered the job after a crash: reload it with `getJob`), `NotFoundError`,
 * `BadRequestError`, `UnauthorizedError`, and `UnavailableError` when the client gave up
 * reconnecting.
 *
 * @implements {AsyncIterableIterator<JobEventsMessage>}
 */
export class JobWatch {
  /** @type {WatchHost} */
  #host;
  /** @type {JobEventsMessage[]} */
  #queue = [];
  #bufferSize;
  /** @type {{ resolve: (r: IteratorResult<JobEventsMessage>) => void, reject: (e: unknown) => void } | null} */
  #waiter = null;
  /** @type {unknown} */
  #error = null;
  #overflowed = false;
  /** @type {string | null} the id of the latest `job.watch` */
  #subscription = null;
  #serverDone = false;
  #closed = false;
  /** @type {AbortSignal | undefined} */
  #signal;
  #onAbort = () => this.#abort();

  /**
   * @param {WatchHost} host
   * @param {string} jobId
   * @param {{ afterSeq?: number, epoch?: number | null, bufferSize?: number, signal?: AbortSignal }} options
   */
  constructor(host, jobId, options) {
    const afterSeq = options.afterSeq ?? 0;
    if (!Number.isInteger(afterSeq) || afterSeq < 0) throw new TypeError("afterSeq must be an integer >= 0");
    this.#host = host;
    this.#bufferSize = Math.max(2, options.bufferSize ?? 64);
    /** The job watched. */
    this.jobId = jobId;
    /** The last `seq` delivered to the consumer. */
    this.cursor = afterSeq;
    /** The last `seq` received (delivered or buffered): a new subscription resumes after it. */
    this.resumeSeq = afterSeq;
    /** @type {number | null} The log's epoch, once known. */
    this.epoch = options.epoch ?? null;
    /** True while the server sends this watch's batches on the current connection. */
    this.live = false;
    /** How many times the watch subscribed (1 + resumes). */
    this.subscriptions = 0;
    this.#signal = options.signal;
    if (this.#signal?.aborted) this.#abort();
    else this.#signal?.addEventListener("abort", this.#onAbort, { once: true });
  }

  /** True once the watch ended: the job finished and its last batch was read, or it was closed. */
  get ended() {
    return this.#closed;
  }

  /** True while the watch should be subscribed: not ended, not failed, not waiting for its consumer. */
  get wantsBatches() {
    return !this.#closed && !this.#serverDone && !this.#overflowed && this.#error === null;
  }

  /** Batches received and not yet read. */
  get buffered() {
    return this.#queue.length;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /**
   * The next batch. Waits for it; resolves `done` after the job's last batch or a `close()`.
   * @returns {Promise<IteratorResult<JobEventsMessage>>}
   */
  next() {
    const batch = this.#queue.shift();
    if (batch !== undefined) {
      this.cursor = batch.to_seq;
      if (this.#overflowed && this.#queue.length <= this.#bufferSize / 2) {
        this.#overflowed = false;
        this.#host.subscribe(this);
      }
      return Promise.resolve({ value: batch, done: false });
    }
    if (this.#error !== null) {
      const error = this.#error;
      this.#error = null;
      this.#finish(false);
      return Promise.reject(error);
    }
    if (this.#serverDone || this.#closed) {
      this.#finish(false);
      return Promise.resolve({ value: undefined, done: true });
    }
    if (this.#waiter !== null) return Promise.reject(new Error("next() called again before the previous one settled"));
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
    });
  }

  /**
   * Stop watching (sends `job.unwatch` if the server still sends batches). Called by a
   * `for await` loop that is left early.
   * @returns {Promise<IteratorResult<JobEventsMessage>>}
   */
  return() {
    this.close();
    return Promise.resolve({ value: undefined, done: true });
  }

  /** Stop watching. Batches not yet read are dropped; a waiting `next()` resolves `done`. */
  close() {
    this.#queue.length = 0;
    this.#finish(this.live && !this.#serverDone);
    this.#wake();
  }

  // -- called by the client -------------------------------------------------------------------

  /**
   * A `job.watch` for this watch is being sent: batches are dropped until its reply, since
   * until then they may belong to an earlier subscription.
   * @param {string} requestId
   */
  _subscribing(requestId) {
    this.live = false;
    this.#subscription = requestId;
  }

  /**
   * The server answered a `job.watch` with `job.watching`; only the latest one counts.
   * @param {JobSummary} job
   * @param {string} requestId
   */
  _watching(job, requestId) {
    if (requestId !== this.#subscription) return;
    this.live = true;
    this.subscriptions += 1;
    if (this.epoch === null) this.epoch = job.epoch;
    const terminal = job.status !== "running" && job.status !== "awaiting_approval";
    if (terminal && job.seq <= this.resumeSeq) {
      this.#serverDone = true; // nothing after the cursor: the job is complete
      this.#wake();
    }
  }

  /** The connection closed: batches stop until the next subscription. */
  _paused() {
    this.live = false;
    this.#subscription = null;
  }

  /**
   * A batch for this job arrived.
   * @param {JobEventsMessage} batch
   */
  _deliver(batch) {
    if (!this.live || this.#closed || this.#overflowed) return; // from a subscription that ended
    if (batch.from_seq !== this.resumeSeq + 1) {
      if (batch.to_seq <= this.resumeSeq) return; // already received
      this._fail(new ProtocolError(`batch of ${this.jobId} starts at seq ${batch.from_seq}, expected ${this.resumeSeq + 1}`));
      return;
    }
    if (this.#queue.length >= this.#bufferSize) {
      // Full: stop the server's batches and resubscribe from resumeSeq once the consumer catches up.
      this.#overflowed = true;
      this.live = false;
      this.#host.unsubscribe(this);
      return;
    }
    this.#queue.push(batch);
    this.resumeSeq = batch.to_seq;
    this.epoch = batch.epoch;
    if (terminalEvent(batch) !== null) this.#serverDone = true;
    this.#wake();
  }

  /**
   * The watch cannot go on: the iteration throws `error` once the buffered batches are read.
   * @param {unknown} error
   */
  _fail(error) {
    if (this.#closed || this.#error !== null) return;
    if (error instanceof GoneError && this.#rewind(error)) return;
    if (error instanceof GoneError && error.jobId === null) error.jobId = this.jobId;
    this.#error = error;
    this.live = false;
    this.#host.release(this, false);
    this.#wake();
  }

  // -- internals ----------------------------------------------------------------------------

  /**
   * A `gone` that says what of this watch's view the log kept after a takeover: queue a batch
   * holding a `rewind` to that seq (`from_seq` one past `to_seq`: no entry of the log), which
   * `joinContent` applies, and subscribe again from there at the log's epoch.
   * @param {GoneError} error
   * @returns {boolean} false if the error does not say
   */
  #rewind(error) {
    const { validThrough: kept, contentLength: length, epoch } = error;
    if (kept === null || length === null || epoch === null || kept < 0 || kept > this.resumeSeq) return false;
    /** @type {JobEventsMessage} */
    const batch = {
      type: "job.events",
      job_id: this.jobId,
      epoch,
      from_seq: kept + 1,
      to_seq: kept,
      events: [{ seq: kept, kind: "rewind", to_seq: kept, content_length: length }],
    };
    this.#queue.push(batch);
    this.resumeSeq = kept;
    this.epoch = epoch;
    this.live = false;
    this.#host.subscribe(this);
    this.#wake();
    return true;
  }

  #wake() {
    const waiter = this.#waiter;
    if (waiter === null) return;
    this.#waiter = null;
    this.next().then(waiter.resolve, waiter.reject);
  }

  /** @param {boolean} unwatch */
  #finish(unwatch) {
    if (this.#closed) return;
    this.#closed = true;
    this.live = false;
    this.#signal?.removeEventListener("abort", this.#onAbort);
    this.#host.release(this, unwatch);
  }

  #abort() {
    const reason = this.#signal?.reason ?? new Error("aborted");
    this.#queue.length = 0;
    this.#finish(this.live && !this.#serverDone);
    const waiter = this.#waiter;
    this.#waiter = null;
    if (waiter !== null) waiter.reject(reason);
    else this.#error = reason;
  }
}
