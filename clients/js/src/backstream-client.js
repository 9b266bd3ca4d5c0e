// backstream-client: start AI jobs on a backstream server, watch them live, and resume after
// any disconnect with nothing lost or repeated. Runs in browsers and in Node; no dependencies.
//
//   import { connect } from "backstream-client";
//   const client = await connect("ws://127.0.0.1:8765/v1", { token: "tokA" });
//   const started = await client.startJob({ threadId: "t1", messageId: "m1", model: "backstream/echo",
//                                           messages: [{ role: "user", content: "hello" }] });
//   for await (const batch of client.watch(started.job.job_id)) console.log(batchText(batch));

export { Client, connect } from "./client.js";
export { JobWatch } from "./watch.js";
export {
  PROTOCOL_VERSION,
  TERMINAL_STATUSES,
  batchText,
  joinContent,
  terminalEvent,
  workflowSteps,
} from "./protocol.js";
export {
  BackstreamError,
  BadRequestError,
  CapacityError,
  ClientClosedError,
  ConflictError,
  ConnectionLostError,
  GoneError,
  InternalError,
  NotFoundError,
  ProtocolError,
  QuotaExceededError,
  RateLimitedError,
  RequestTimeoutError,
  TooLargeError,
  UnauthorizedError,
  UnavailableError,
  UnsupportedProtocolError,
  errorFromMessage,
} from "./errors.js";

/** @typedef {import("./client.js").ConnectOptions} ConnectOptions */
/** @typedef {import("./client.js").ConnectionState} ConnectionState */
/** @typedef {import("./client.js").ClientStatistics} ClientStatistics */
/** @typedef {import("./client.js").WebSocketConstructor} WebSocketConstructor */
/** @typedef {import("./protocol.js").JobSummary} JobSummary */
/** @typedef {import("./protocol.js").JobStatus} JobStatus */
/** @typedef {import("./protocol.js").JobEvent} JobEvent */
/** @typedef {import("./protocol.js").JobEventsMessage} JobEventsMessage */
/** @typedef {import("./protocol.js").StepEvent} StepEvent */
/** @typedef {import("./protocol.js").WorkflowStep} WorkflowStep */
/** @typedef {import("./protocol.js").JobStarted} JobStarted */
/** @typedef {import("./protocol.js").JobInfo} JobInfo */
/** @typedef {import("./protocol.js").JobAbortResult} JobAbortResult */
/** @typedef {import("./protocol.js").JobListResult} JobListResult */
/** @typedef {import("./protocol.js").JobApproveResult} JobApproveResult */
/** @typedef {import("./protocol.js").Notification} Notification */
/** @typedef {import("./protocol.js").NotificationsResult} NotificationsResult */
/** @typedef {import("./protocol.js").NotificationsReadResult} NotificationsReadResult */
/** @typedef {import("./protocol.js").ThreadMuteResult} ThreadMuteResult */
/** @typedef {import("./protocol.js").Welcome} Welcome */
