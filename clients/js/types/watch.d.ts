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
export class JobWatch implements AsyncIterableIterator<JobEventsMessage> {
    /**
     * @param {WatchHost} host
     * @param {string} jobId
     * @param {{ afterSeq?: number, epoch?: number | null, bufferSize?: number, signal?: AbortSignal }} options
     */
    constructor(host: WatchHost, jobId: string, options: {
        afterSeq?: number;
        epoch?: number | null;
        bufferSize?: number;
        signal?: AbortSignal;
    });
    /** The job watched. */
    jobId: string;
    /** The last `seq` delivered to the consumer. */
    cursor: number;
    /** The last `seq` received (delivered or buffered): a new subscription resumes after it. */
    resumeSeq: number;
    /** @type {number | null} The log's epoch, once known. */
    epoch: number | null;
    /** True while the server sends this watch's batches on the current connection. */
    live: boolean;
    /** How many times the watch subscribed (1 + resumes). */
    subscriptions: number;
    /** True once the watch ended: the job finished and its last batch was read, or it was closed. */
    get ended(): boolean;
    /** True while the watch should be subscribed: not ended, not failed, not waiting for its consumer. */
    get wantsBatches(): boolean;
    /** Batches received and not yet read. */
    get buffered(): number;
    /**
     * The next batch. Waits for it; resolves `done` after the job's last batch or a `close()`.
     * @returns {Promise<IteratorResult<JobEventsMessage>>}
     */
    next(): Promise<IteratorResult<JobEventsMessage>>;
    /**
     * Stop watching (sends `job.unwatch` if the server still sends batches). Called by a
     * `for await` loop that is left early.
     * @returns {Promise<IteratorResult<JobEventsMessage>>}
     */
    return(): Promise<IteratorResult<JobEventsMessage>>;
    /** Stop watching. Batches not yet read are dropped; a waiting `next()` resolves `done`. */
    close(): void;
    /**
     * A `job.watch` for this watch is being sent: batches are dropped until its reply, since
     * until then they may belong to an earlier subscription.
     * @param {string} requestId
     */
    _subscribing(requestId: string): void;
    /**
     * The server answered a `job.watch` with `job.watching`; only the latest one counts.
     * @param {JobSummary} job
     * @param {string} requestId
     */
    _watching(job: JobSummary, requestId: string): void;
    /** The connection closed: batches stop until the next subscription. */
    _paused(): void;
    /**
     * A batch for this job arrived.
     * @param {JobEventsMessage} batch
     */
    _deliver(batch: JobEventsMessage): void;
    /**
     * The watch cannot go on: the iteration throws `error` once the buffered batches are read.
     * @param {unknown} error
     */
    _fail(error: unknown): void;
    [Symbol.asyncIterator](): this;
    #private;
}
export type JobEventsMessage = import("./protocol.js").JobEventsMessage;
export type JobSummary = import("./protocol.js").JobSummary;
/**
 * What a watch needs from its client.
 */
export type WatchHost = {
    /**
     * send `job.watch` from `watch.resumeSeq` when a session is open
     */
    subscribe: (watch: JobWatch) => void;
    /**
     * send `job.unwatch`, keeping the watch for a later subscribe
     */
    unsubscribe: (watch: JobWatch) => void;
    /**
     * forget the watch; send `job.unwatch` if asked
     */
    release: (watch: JobWatch, unwatch: boolean) => void;
};
