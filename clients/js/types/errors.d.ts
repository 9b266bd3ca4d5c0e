/**
 * The typed error for an `error` message of the protocol.
 * @param {{ code: string, message: string, retry_after_ms?: number | null, job_id?: string | null,
 *   valid_through?: number | null, content_length?: number | null, epoch?: number | null }} message
 * @returns {BackstreamError}
 */
export function errorFromMessage(message: {
    code: string;
    message: string;
    retry_after_ms?: number | null;
    job_id?: string | null;
    valid_through?: number | null;
    content_length?: number | null;
    epoch?: number | null;
}): BackstreamError;
/** Every error this client raises. `code` is the protocol's error code (PROTOCOL.md, "Errors"). */
export class BackstreamError extends Error {
    /**
     * @param {string} code
     * @param {string} message
     * @param {{ cause?: unknown }} [options]
     */
    constructor(code: string, message: string, options?: {
        cause?: unknown;
    });
    /** @type {string} */
    code: string;
}
/** A malformed request, an unknown model or tool, a cursor past a finished job's end. */
export class BadRequestError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
/** A bad or expired token. */
export class UnauthorizedError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
/** The server does not speak protocol version 1. */
export class UnsupportedProtocolError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
/** No such job, or another user's: the two are indistinguishable. */
export class NotFoundError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
/** The server or the user is at the limit of running jobs; retry after `retryAfterMs`. */
export class CapacityError extends BackstreamError {
    /**
     * @param {string} message
     * @param {number | null} [retryAfterMs]
     */
    constructor(message: string, retryAfterMs?: number | null);
    /** @type {number | null} */
    retryAfterMs: number | null;
}
/** Too many requests on this connection; slow down. */
export class RateLimitedError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
/**
 * The user's retained jobs hold the server's quota of stored bytes already: a new job is
 * refused until some of them expire (their retention) and the server frees them.
 */
export class QuotaExceededError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
/** The request conflicts with the job's state (e.g. approving a call that is not waiting). */
export class ConflictError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
/**
 * The job's log moved to another epoch (the server recovered it after a crash) or its
 * entries are no longer kept: what was received cannot be continued. Reload the job with
 * `client.getJob(jobId, { includeContent: true })`, or watch it again from seq 0.
 *
 * After a takeover, a cursor past what the log kept of its epoch gets this error with
 * `validThrough` (the last seq of the view that stands), `contentLength` (the content's
 * length there) and `epoch` (the log's now); a `JobWatch` handles it itself (a `rewind`).
 */
export class GoneError extends BackstreamError {
    /**
     * @param {string} message
     * @param {string | null} [jobId]
     * @param {{ validThrough?: number | null, contentLength?: number | null, epoch?: number | null }} [kept]
     */
    constructor(message: string, jobId?: string | null, kept?: {
        validThrough?: number | null;
        contentLength?: number | null;
        epoch?: number | null;
    });
    /** @type {string | null} */
    jobId: string | null;
    /** @type {number | null} */
    validThrough: number | null;
    /** @type {number | null} */
    contentLength: number | null;
    /** @type {number | null} */
    epoch: number | null;
}
/** A reply would exceed the server's frame limit (fetch job content in pieces with `offset`). */
export class TooLargeError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
/** The server (or the connection to it) cannot serve the request now. */
export class UnavailableError extends BackstreamError {
    /**
     * @param {string} message
     * @param {{ cause?: unknown }} [options]
     */
    constructor(message: string, options?: {
        cause?: unknown;
    });
}
/** The connection was lost before the reply came; the request may or may not have been done. */
export class ConnectionLostError extends UnavailableError {
}
/** No reply within `requestTimeoutMs`. */
export class RequestTimeoutError extends UnavailableError {
}
/** The client was closed by `close()`. */
export class ClientClosedError extends UnavailableError {
}
/** The server failed on the request. */
export class InternalError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
/** The server sent something this client cannot read, or a batch that breaks the seq order. */
export class ProtocolError extends BackstreamError {
    /** @param {string} message */
    constructor(message: string);
}
