// What the demo page remembers: threads and their turns, and each running job's progress
// (its last seq and what was shown up to it), in localStorage so a reload resumes.

import { workflowSteps } from "../client/backstream-client.js";

/** @typedef {import("../client/backstream-client.js").JobEventsMessage} JobEventsMessage */
/** @typedef {import("../client/backstream-client.js").JobStatus} JobStatus */
/** @typedef {import("../client/backstream-client.js").JobInfo} JobInfo */
/** @typedef {import("../client/backstream-client.js").JobWatch} JobWatch */
/** @typedef {import("../client/backstream-client.js").WorkflowStep} WorkflowStep */

/**
 * @typedef {{ kind: "text" | "reasoning", text: string }} TextPart
 * @typedef {{ kind: "tool", callId: string, name: string, arguments: string,
 *   approval: "pending" | "approved" | "denied" | null, output: string | null, isError: boolean }} ToolPart
 * @typedef {TextPart | ToolPart} Part
 */

/**
 * One answer as the page knows it: the job's log folded up to `seq`.
 * @typedef {object} JobView
 * @property {string} jobId
 * @property {number} seq
 * @property {number | null} epoch
 * @property {Part[]} parts
 * @property {WorkflowStep[]} steps a workflow's steps (none for a model's answer)
 * @property {JobStatus | "unknown" | "missing"} status from the log; "missing": the server no longer has the job
 * @property {string | undefined} [remote] the status the server last reported in a summary or notification
 * @property {string | null} error
 * @property {string | null} note a remark shown under the answer (e.g. it was reloaded)
 * @property {JobWatch | null} watch
 * @property {number} resumedAt the seq a resumed watch started after (0: from the start)
 */

/**
 * @typedef {{ messageId: string, text: string, model: string, jobId: string | null, error: string | null }} Turn
 * @typedef {{ id: string, title: string, updatedAt: number, muted: boolean, turns: Turn[], model?: string }} Thread
 *   `model`: the model the picker shows for the thread (the last one used or picked in it)
 */

const PREFIX = "backstream-demo:v1";
const MAX_THREADS = 50;
const MAX_TURNS = 100;
const MAX_SAVED_JOBS = 50;
export const TERMINAL = new Set(["completed", "failed", "aborted", "interrupted"]);

/** @param {string} prefix */
export function newId(prefix) {
  return `${prefix}_${crypto.randomUUID().replaceAll("-", "").slice(0, 20)}`;
}

/**
 * @param {string} key
 * @returns {unknown}
 */
function load(key) {
  try {
    const raw = localStorage.getItem(`${PREFIX}:${key}`);
    return raw === null ? null : JSON.parse(raw);
  } catch {
    return null;
  }
}

/**
 * Save, or drop the value if storage is full: the page then replays from the server.
 * @param {string} key
 * @param {unknown} value
 */
function save(key, value) {
  try {
    localStorage.setItem(`${PREFIX}:${key}`, JSON.stringify(value));
  } catch {
    localStorage.removeItem(`${PREFIX}:${key}`);
  }
}

export function loadToken() {
  const value = load("token");
  return typeof value === "string" ? value : null;
}

/** @param {string | null} token */
export function saveToken(token) {
  if (token === null) localStorage.removeItem(`${PREFIX}:token`);
  else save("token", token);
}

/**
 * @param {string} name
 * @returns {unknown}
 */
export function loadSetting(name) {
  return load(`setting:${name}`);
}

/**
 * @param {string} name
 * @param {unknown} value
 */
export function saveSetting(name, value) {
  save(`setting:${name}`, value);
}

/**
 * The user's threads, most recent first.
 * @param {string} user
 * @returns {Thread[]}
 */
export function loadThreads(user) {
  const value = load(`threads:${user}`);
  return Array.isArray(value) ? /** @type {Thread[]} */ (value) : [];
}

/**
 * @param {string} user
 * @param {Thread[]} threads
 */
export function saveThreads(user, threads) {
  threads.sort((a, b) => b.updatedAt - a.updatedAt);
  threads.splice(MAX_THREADS);
  for (const thread of threads) thread.turns.splice(0, Math.max(0, thread.turns.length - MAX_TURNS));
  save(`threads:${user}`, threads);
}

/**
 * A job's view: from memory, else from storage (a reload mid-answer), else empty.
 * @param {string} jobId
 * @returns {JobView}
 */
export function restoreView(jobId) {
  const saved = /** @type {{ seq: number, epoch: number | null, parts: Part[], steps?: WorkflowStep[], status: JobStatus } | null} */ (
    load(`job:${jobId}`)
  );
  const view = {
    jobId,
    seq: 0,
    epoch: /** @type {number | null} */ (null),
    parts: /** @type {Part[]} */ ([]),
    steps: /** @type {WorkflowStep[]} */ ([]),
    status: /** @type {JobStatus | "unknown" | "missing"} */ ("unknown"),
    error: null,
    note: null,
    watch: null,
    resumedAt: 0,
  };
  if (saved !== null && Number.isInteger(saved.seq) && Array.isArray(saved.parts)) {
    const steps = Array.isArray(saved.steps) ? saved.steps : [];
    Object.assign(view, { seq: saved.seq, epoch: saved.epoch, parts: saved.parts, steps, status: saved.status });
  }
  return view;
}

/**
 * Keep a running job's progress (seq and parts together, so a reload resumes exactly after
 * what it shows); forget it once the job ended (a finished job is replayed from the server).
 * @param {JobView} view
 */
export function persistView(view) {
  if (TERMINAL.has(view.status)) {
    localStorage.removeItem(`${PREFIX}:job:${view.jobId}`);
    return;
  }
  const { seq, epoch, parts, steps, status } = view;
  save(`job:${view.jobId}`, { seq, epoch, parts, steps, status });
  const index = /** @type {string[]} */ (load("jobs") ?? []).filter((id) => id !== view.jobId);
  index.push(view.jobId);
  for (const old of index.splice(0, Math.max(0, index.length - MAX_SAVED_JOBS))) {
    localStorage.removeItem(`${PREFIX}:job:${old}`);
  }
  save("jobs", index);
}

/**
 * Fold a batch into the view. Batches arrive in order from the view's seq, so each log entry
 * is applied exactly once.
 * @param {JobView} view
 * @param {JobEventsMessage} batch
 */
export function applyBatch(view, batch) {
  for (const event of batch.events) {
    switch (event.kind) {
      case "text":
      case "reasoning": {
        const last = view.parts[view.parts.length - 1];
        if (last !== undefined && last.kind === event.kind) last.text += event.text;
        else view.parts.push({ kind: event.kind, text: event.text });
        break;
      }
      case "tool_call":
        toolPart(view, event.call_id, event.name, event.arguments);
        break;
      case "approval_required":
        toolPart(view, event.call_id, event.name, event.arguments).approval = "pending";
        break;
      case "approval":
        toolPart(view, event.call_id, "", "").approval = event.approved ? "approved" : "denied";
        break;
      case "tool_result": {
        const part = toolPart(view, event.call_id, event.name, "");
        part.output = event.output;
        part.isError = event.is_error;
        break;
      }
      case "step": {
        view.steps = workflowSteps(view.steps, [event]);
        // A step that asked a person shows as a tool card: it ends with the step.
        const asked = view.parts.find((p) => p.kind === "tool" && p.callId === `step_${event.step}`);
        if (event.phase === "finished" && asked !== undefined && asked.kind === "tool") {
          asked.output = event.summary;
          asked.isError = event.is_error;
        }
        break;
      }
      case "status":
        view.status = event.status;
        view.error = event.error ? event.error.message : null;
        break;
    }
  }
  view.seq = batch.to_seq;
  view.epoch = batch.epoch;
}

/**
 * @param {JobView} view
 * @param {string} callId
 * @param {string} name
 * @param {string} args
 * @returns {ToolPart}
 */
function toolPart(view, callId, name, args) {
  for (const part of view.parts) if (part.kind === "tool" && part.callId === callId) return part;
  /** @type {ToolPart} */
  const part = { kind: "tool", callId, name, arguments: args, approval: null, output: null, isError: false };
  view.parts.push(part);
  return part;
}

/**
 * The answer's text: what the model said (for the next turn's history).
 * @param {JobView | undefined} view
 */
export function viewText(view) {
  if (view === undefined) return "";
  return view.parts.map((part) => (part.kind === "text" ? part.text : "")).join("");
}
