/**
 * @typedef {"running" | "awaiting_approval" | "completed" | "failed" | "aborted" | "interrupted"} JobStatus
 */
/**
 * @typedef {object} JobError
 * @property {string} code e.g. `timeout`, `upstream_http`, `upstream_error`, `tool_loop_limit`, `internal`
 * @property {string} message
 * @property {number | null} [http_status]
 */
/**
 * @typedef {object} JobSummary
 * @property {string} job_id
 * @property {string} thread_id
 * @property {string} message_id
 * @property {JobStatus} status
 * @property {string} model
 * @property {number} seq the last seq of the job's log
 * @property {number} epoch
 * @property {number} content_length characters of text content
 * @property {string} created_at RFC 3339 UTC
 * @property {string} updated_at
 * @property {string | null} finished_at
 * @property {JobError | null} error
 * @property {Record<string, unknown> | null} usage
 * @property {number} watchers
 */
/** @typedef {{ seq: number, kind: "text", text: string }} TextEvent */
/** @typedef {{ seq: number, kind: "reasoning", text: string }} ReasoningEvent */
/** @typedef {{ seq: number, kind: "tool_call", call_id: string, name: string, arguments: string }} ToolCallEvent */
/** @typedef {{ seq: number, kind: "approval_required", call_id: string, name: string, arguments: string }} ApprovalRequiredEvent */
/** @typedef {{ seq: number, kind: "approval", call_id: string, approved: boolean }} ApprovalEvent */
/** @typedef {{ seq: number, kind: "tool_result", call_id: string, name: string, output: string, is_error: boolean }} ToolResultEvent */
/** @typedef {{ seq: number, kind: "rewind", to_seq: number, content_length: number }} RewindEvent */
/**
 * A workflow's step started or finished (docs/workflows.md).
 * @typedef {{ seq: number, kind: "step", step: number, name: string, phase: "started" | "finished",
 *   summary: string, data: string | null, is_error: boolean }} StepEvent
 */
/**
 * @typedef {{ seq: number, kind: "status", status: JobStatus, error: JobError | null,
 *   finish_reason: string | null, usage: Record<string, unknown> | null }} StatusEvent
 */
/**
 * @typedef {TextEvent | ReasoningEvent | ToolCallEvent | ApprovalRequiredEvent | ApprovalEvent
 *   | ToolResultEvent | RewindEvent | StepEvent | StatusEvent} JobEvent
 */
/**
 * One batch of a watch: the log entries `from_seq` to `to_seq`, in order.
 * @typedef {object} JobEventsMessage
 * @property {"job.events"} type
 * @property {string} job_id
 * @property {number} epoch
 * @property {number} from_seq
 * @property {number} to_seq
 * @property {JobEvent[]} events
 */
/**
 * @typedef {object} Welcome
 * @property {"welcome"} type
 * @property {string} id
 * @property {number} protocol
 * @property {string} user
 * @property {string} session_id
 * @property {{ name: string, version: string }} server
 * @property {{ tools?: string[], approvals?: boolean, notifications?: boolean } & Record<string, unknown>} features
 * @property {{ max_message_bytes?: number, max_jobs_per_user?: number, batch_ms?: number } & Record<string, unknown>} limits
 */
/** @typedef {{ type: "job.started", id: string, job: JobSummary, existing: boolean, stream?: string | null }} JobStarted */
/** @typedef {{ type: "job.watching", id: string, job: JobSummary }} JobWatching */
/** @typedef {{ type: "job.unwatched", id: string, job_id: string }} JobUnwatched */
/** @typedef {{ type: "job.abort.result", id: string, aborted: boolean, job: JobSummary }} JobAbortResult */
/**
 * @typedef {{ call_id: string, name: string, arguments: string, output: string | null,
 *   is_error: boolean, approved: boolean | null }} ToolCallRecord
 */
/**
 * A workflow's step as a list shows it: `running` until it finishes.
 * @typedef {{ step: number, name: string, status: "running" | "finished" | "failed", summary: string }} WorkflowStep
 */
/**
 * @typedef {{ type: "job.info", id: string, job: JobSummary, content: string | null,
 *   tool_calls: ToolCallRecord[], step?: WorkflowStep,
 *   stream?: string | null }} JobInfo
 */
/** @typedef {{ type: "job.list.result", id: string, jobs: JobSummary[] }} JobListResult */
/** @typedef {{ type: "job.approve.result", id: string, job: JobSummary }} JobApproveResult */
/**
 * @typedef {object} Notification
 * @property {string} notification_id
 * @property {"ai.message.received" | "system.warning" | "ai.tool.approval_required"} type
 * @property {string} job_id
 * @property {string} thread_id
 * @property {string} title
 * @property {string} body
 * @property {string} created_at
 * @property {boolean} read
 */
/** @typedef {{ type: "notifications.result", id: string, notifications: Notification[], unread: number }} NotificationsResult */
/** @typedef {{ type: "notifications.read.result", id: string, unread: number }} NotificationsReadResult */
/** @typedef {{ type: "thread.mute.result", id: string, thread_id: string, muted: boolean }} ThreadMuteResult */
/** @typedef {{ type: "pong", id: string }} Pong */
/**
 * `valid_through`, `content_length` and `epoch` come with a `gone` for a cursor of an epoch
 * before a takeover, past what the log kept of it.
 * @typedef {{ type: "error", id: string | null, code: string, message: string, retry_after_ms?: number | null,
 *   job_id?: string | null, valid_through?: number | null, content_length?: number | null, epoch?: number | null }} ErrorMessage
 */
/**
 * The text of a batch: its `text` events joined. Joining the text of every batch of a watch
 * gives the job's content from the watch's cursor.
 * @param {JobEventsMessage} batch
 * @returns {string}
 */
export function batchText(batch: JobEventsMessage): string;
/**
 * The job's content after a batch: `content` (what the batches before it gave, from the log's
 * start) with the batch's text appended and cut back where a `rewind` says (a turn that ran
 * again after its server died withdraws its text so far).
 * @param {string} content
 * @param {JobEventsMessage} batch
 * @returns {string}
 */
export function joinContent(content: string, batch: JobEventsMessage): string;
/**
 * The terminal status event of a batch, if it ends the job.
 * @param {JobEventsMessage} batch
 * @returns {StatusEvent | null}
 */
export function terminalEvent(batch: JobEventsMessage): StatusEvent | null;
/**
 * A workflow's steps after some of its log entries: `steps` (what the entries before gave,
 * or `[]` from the log's start) with each `step` event applied, in order of their numbers.
 * A step that started appears `running` with what it was asked as its summary; when it
 * finishes it becomes `finished` (or `failed`) with its result's summary.
 * @param {WorkflowStep[]} steps
 * @param {Iterable<JobEvent>} events
 * @returns {WorkflowStep[]}
 */
export function workflowSteps(steps: WorkflowStep[], events: Iterable<JobEvent>): WorkflowStep[];
export const PROTOCOL_VERSION: 1;
/** @type {ReadonlyArray<JobStatus>} */
export const TERMINAL_STATUSES: ReadonlyArray<JobStatus>;
export type JobStatus = "running" | "awaiting_approval" | "completed" | "failed" | "aborted" | "interrupted";
export type JobError = {
    /**
     * e.g. `timeout`, `upstream_http`, `upstream_error`, `tool_loop_limit`, `internal`
     */
    code: string;
    message: string;
    http_status?: number | null | undefined;
};
export type JobSummary = {
    job_id: string;
    thread_id: string;
    message_id: string;
    status: JobStatus;
    model: string;
    /**
     * the last seq of the job's log
     */
    seq: number;
    epoch: number;
    /**
     * characters of text content
     */
    content_length: number;
    /**
     * RFC 3339 UTC
     */
    created_at: string;
    updated_at: string;
    finished_at: string | null;
    error: JobError | null;
    usage: Record<string, unknown> | null;
    watchers: number;
};
export type TextEvent = {
    seq: number;
    kind: "text";
    text: string;
};
export type ReasoningEvent = {
    seq: number;
    kind: "reasoning";
    text: string;
};
export type ToolCallEvent = {
    seq: number;
    kind: "tool_call";
    call_id: string;
    name: string;
    arguments: string;
};
export type ApprovalRequiredEvent = {
    seq: number;
    kind: "approval_required";
    call_id: string;
    name: string;
    arguments: string;
};
export type ApprovalEvent = {
    seq: number;
    kind: "approval";
    call_id: string;
    approved: boolean;
};
export type ToolResultEvent = {
    seq: number;
    kind: "tool_result";
    call_id: string;
    name: string;
    output: string;
    is_error: boolean;
};
export type RewindEvent = {
    seq: number;
    kind: "rewind";
    to_seq: number;
    content_length: number;
};
/**
 * A workflow's step started or finished (docs/workflows.md).
 */
export type StepEvent = {
    seq: number;
    kind: "step";
    step: number;
    name: string;
    phase: "started" | "finished";
    summary: string;
    data: string | null;
    is_error: boolean;
};
export type StatusEvent = {
    seq: number;
    kind: "status";
    status: JobStatus;
    error: JobError | null;
    finish_reason: string | null;
    usage: Record<string, unknown> | null;
};
export type JobEvent = TextEvent | ReasoningEvent | ToolCallEvent | ApprovalRequiredEvent | ApprovalEvent | ToolResultEvent | RewindEvent | StepEvent | StatusEvent;
/**
 * One batch of a watch: the log entries `from_seq` to `to_seq`, in order.
 */
export type JobEventsMessage = {
    type: "job.events";
    job_id: string;
    epoch: number;
    from_seq: number;
    to_seq: number;
    events: JobEvent[];
};
export type Welcome = {
    type: "welcome";
    id: string;
    protocol: number;
    user: string;
    session_id: string;
    server: {
        name: string;
        version: string;
    };
    features: {
        tools?: string[];
        approvals?: boolean;
        notifications?: boolean;
    } & Record<string, unknown>;
    limits: {
        max_message_bytes?: number;
        max_jobs_per_user?: number;
        batch_ms?: number;
    } & Record<string, unknown>;
};
export type JobStarted = {
    type: "job.started";
    id: string;
    job: JobSummary;
    existing: boolean;
    stream?: string | null;
};
export type JobWatching = {
    type: "job.watching";
    id: string;
    job: JobSummary;
};
export type JobUnwatched = {
    type: "job.unwatched";
    id: string;
    job_id: string;
};
export type JobAbortResult = {
    type: "job.abort.result";
    id: string;
    aborted: boolean;
    job: JobSummary;
};
export type ToolCallRecord = {
    call_id: string;
    name: string;
    arguments: string;
    output: string | null;
    is_error: boolean;
    approved: boolean | null;
};
/**
 * A workflow's step as a list shows it: `running` until it finishes.
 */
export type WorkflowStep = {
    step: number;
    name: string;
    status: "running" | "finished" | "failed";
    summary: string;
};
export type JobInfo = {
    type: "job.info";
    id: string;
    job: JobSummary;
    content: string | null;
    tool_calls: ToolCallRecord[];
    step?: WorkflowStep;
    stream?: string | null;
};
export type JobListResult = {
    type: "job.list.result";
    id: string;
    jobs: JobSummary[];
};
export type JobApproveResult = {
    type: "job.approve.result";
    id: string;
    job: JobSummary;
};
export type Notification = {
    notification_id: string;
    type: "ai.message.received" | "system.warning" | "ai.tool.approval_required";
    job_id: string;
    thread_id: string;
    title: string;
    body: string;
    created_at: string;
    read: boolean;
};
export type NotificationsResult = {
    type: "notifications.result";
    id: string;
    notifications: Notification[];
    unread: number;
};
export type NotificationsReadResult = {
    type: "notifications.read.result";
    id: string;
    unread: number;
};
export type ThreadMuteResult = {
    type: "thread.mute.result";
    id: string;
    thread_id: string;
    muted: boolean;
};
export type Pong = {
    type: "pong";
    id: string;
};
/**
 * `valid_through`, `content_length` and `epoch` come with a `gone` for a cursor of an epoch
 * before a takeover, past what the log kept of it.
 */
export type ErrorMessage = {
    type: "error";
    id: string | null;
    code: string;
    message: string;
    retry_after_ms?: number | null;
    job_id?: string | null;
    valid_through?: number | null;
    content_length?: number | null;
    epoch?: number | null;
};
