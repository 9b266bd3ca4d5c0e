// Typed errors: one class per protocol error code, plus the client's own failures.

/** Every error this client raises. `code` is the protocol's error code (PROTOCOL.md, "Errors"). */
export class BackstreamError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{ cause?: unknown }} [options]
   */
  constructor(code, message, options) {
    super(message, options);
    /** @type {string} */
    this.code = code;
    this.name = new.target.name;
  }
}

/** A malformed request, an unknown model or tool, a cursor past a finished job's end. */
export class BadRequestError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("bad_request", message); }
}

/** A bad or expired token. */
export class UnauthorizedError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("unauthorized", message); }
}

/** The server does not speak protocol version 1. */
export class UnsupportedProtocolError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("unsupported_protocol", message); }
}

/** No such job, or another user's: the two are indistinguishable. */
export class NotFoundError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("not_found", message); }
}

/** The server or the user is at the limit of running jobs; retry after `retryAfterMs`. */
export class CapacityError extends BackstreamError {
  /**
   * @param {string} message
   * @param {number | null} [retryAfterMs]
   */
  constructor(message, retryAfterMs = null) {
    super("capacity", message);
    /** @type {number | null} */
    this.retryAfterMs = retryAfterMs;
  }
}

/** Too many requests on this connection; slow down. */
export class RateLimitedError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("rate_limited", message); }
}

/**
 * The user's retained jobs hold the server's quota of stored bytes already: a new job is
 * refused until some of them expire (their retention) and the server frees them.
 */
export class QuotaExceededError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("quota_exceeded", message); }
}

/** The request conflicts with the job's state (e.g. approving a call that is not waiting). */
export class ConflictError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("conflict", message); }
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
  constructor(message, jobId = null, kept = {}) {
    super("gone", message);
    /** @type {string | null} */
    this.jobId = jobId;
    /** @type {number | null} */
    this.validThrough = kept.validThrough ?? null;
    /** @type {number | null} */
    this.contentLength = kept.contentLength ?? null;
    /** @type {number | null} */
    this.epoch = kept.epoch ?? null;
  }
}

/** A reply would exceed the server's frame limit (fetch job content in pieces with `offset`). */
export class TooLargeError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("too_large", message); }
}

/** The server (or the connection to it) cannot serve the request now. */
export class UnavailableError extends BackstreamError {
  /**
   * @param {string} message
   * @param {{ cause?: unknown }} [options]
   */
  constructor(message, options) { super("unavailable", message, options); }
}

/** The connection was lost before the reply came; the request may or may not have been done. */
export class ConnectionLostError extends UnavailableError {}

/** No reply within `requestTimeoutMs`. */
export class RequestTimeoutError extends UnavailableError {}

/** The client was closed by `close()`. */
export class ClientClosedError extends UnavailableError {}

/** The server failed on the request. */
export class InternalError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("internal", message); }
}

/** The server sent something this client cannot read, or a batch that breaks the seq order. */
export class ProtocolError extends BackstreamError {
  /** @param {string} message */
  constructor(message) { super("internal", message); }
}

/** @type {Record<string, new (message: string) => BackstreamError>} */
const BY_CODE = {
  bad_request: BadRequestError,
  unauthorized: UnauthorizedError,
  unsupported_protocol: UnsupportedProtocolError,
  not_found: NotFoundError,
  rate_limited: RateLimitedError,
  quota_exceeded: QuotaExceededError,
  conflict: ConflictError,
  gone: GoneError,
  too_large: TooLargeError,
  unavailable: UnavailableError,
  internal: InternalError,
};

/**
 * The typed error for an `error` message of the protocol.
 * @param {{ code: string, message: string, retry_after_ms?: number | null, job_id?: string | null,
 *   valid_through?: number | null, content_length?: number | null, epoch?: number | null }} message
 * @returns {BackstreamError}
 */
export function errorFromMessage(message) {
  if (message.code === "capacity") return new CapacityError(message.message, message.retry_after_ms ?? null);
  if (message.code === "gone") {
    const kept = { validThrough: message.valid_through, contentLength: message.content_length, epoch: message.epoch };
    return new GoneError(message.message, message.job_id ?? null, kept);
  }
  const ErrorClass = BY_CODE[message.code];
  return ErrorClass ? new ErrorClass(message.message) : new BackstreamError(message.code, message.message);
}
