// DOM for the demo page. Text from users and tools only ever goes in as textContent; a model's
// answer is Markdown, whose HTML is sanitized first (markdown.js).

import { markdownOf } from "./markdown.js";

/** @typedef {import("./state.js").JobView} JobView */
/** @typedef {import("./state.js").Thread} Thread */
/** @typedef {import("./state.js").Turn} Turn */
/** @typedef {import("./state.js").ToolPart} ToolPart */
/** @typedef {import("../client/backstream-client.js").Notification} Notification */

/**
 * @typedef {object} AnswerActions
 * @property {(jobId: string, callId: string, approved: boolean) => void} approve
 * @property {(turn: Turn) => void} retry
 */

const ICONS = {
  tool: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M14.7 6.3a4 4 0 0 0-5.2 5.2l-5.8 5.8a1.5 1.5 0 0 0 2.1 2.1l5.8-5.8a4 4 0 0 0 5.2-5.2l-2.5 2.5-2.1-.5-.5-2.1z"/></svg>',
  check: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M5 12.5l4.5 4.5L19 7.5"/></svg>',
  warn: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 4l9 16H3z"/><path d="M12 10v4m0 3v.01"/></svg>',
  hand: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 3v9m-4-6v8m8-6v6m-12 0v1a7 7 0 0 0 14 0v-7"/></svg>',
  bellOff: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M6 16V11a6 6 0 0 1 9.5-4.9M18 11v5l2 2H7m3 3h4M4 4l16 16"/></svg>',
};

/**
 * Make an element: `h("div", { class: "x", "data-id": "1" }, child, "text")`.
 * @param {string} tag
 * @param {Record<string, string | boolean | undefined>} [attributes]
 * @param {...(Node | string | null | undefined | false)} children
 * @returns {HTMLElement}
 */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === true) element.setAttribute(name, "");
    else if (typeof value === "string") element.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    element.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return element;
}

/**
 * An icon from the fixed set above (static markup, never data).
 * @param {keyof typeof ICONS} name
 */
export function icon(name) {
  const span = h("span", { class: `icon icon-${name}` });
  span.innerHTML = ICONS[name];
  return span;
}

const STATUS_LABELS = {
  running: "Streaming",
  awaiting_approval: "Waiting for you",
  completed: "",
  failed: "Failed",
  aborted: "Stopped",
  interrupted: "Interrupted",
  unknown: "Loading",
  missing: "Expired",
};

/**
 * The thread list of the sidebar.
 * @param {Thread[]} threads
 * @param {{ activeId: string | null, unread: Map<string, number>, running: (thread: Thread) => boolean,
 *   open: (id: string) => void }} options
 * @returns {HTMLElement[]}
 */
export function threadItems(threads, { activeId, unread, running, open }) {
  return threads.map((thread) => {
    const count = unread.get(thread.id) ?? 0;
    const last = thread.turns[thread.turns.length - 1];
    const item = h(
      "button",
      {
        class: `thread-item${thread.id === activeId ? " active" : ""}`,
        "data-thread-id": thread.id,
        "aria-current": thread.id === activeId ? "page" : undefined,
        type: "button",
      },
      h("span", { class: `thread-dot${running(thread) ? " running" : ""}`, title: running(thread) ? "Answering" : undefined }),
      h(
        "span",
        { class: "thread-text" },
        h("span", { class: "thread-title" }, thread.title),
        h("span", { class: "thread-sub" }, last ? last.model.replace(/^backstream\//, "") : "empty"),
      ),
      thread.muted ? icon("bellOff") : null,
      count > 0 ? h("span", { class: "thread-badge", "aria-label": `${count} unread` }, String(count)) : null,
    );
    item.addEventListener("click", () => open(thread.id));
    return item;
  });
}

/**
 * A user's message.
 * @param {Turn} turn
 */
export function userMessage(turn) {
  return h("div", { class: "msg user" }, h("div", { class: "bubble" }, turn.text));
}

/**
 * A turn whose job could not be started.
 * @param {Turn} turn
 * @param {AnswerActions} actions
 */
export function failedStart(turn, actions) {
  const retry = h("button", { class: "link-button", type: "button" }, "Try again");
  retry.addEventListener("click", () => actions.retry(turn));
  return h(
    "article",
    { class: "msg assistant", "data-status": "not-started" },
    avatar(),
    h("div", { class: "answer" }, h("div", { class: "note error" }, icon("warn"), turn.error ?? "", " ", retry)),
  );
}

/** A turn whose job is being started. */
export function pendingAnswer() {
  return h(
    "article",
    { class: "msg assistant", "data-status": "starting" },
    avatar(),
    h("div", { class: "answer" }, h("div", { class: "typing" }, h("i"), h("i"), h("i"))),
  );
}

function avatar() {
  return h("div", { class: "avatar", "aria-hidden": "true" }, "b");
}

/**
 * An answer: its parts in log order, a status line, and the approval prompts.
 * @param {JobView} view
 * @param {string} model
 * @param {AnswerActions} actions
 * @param {boolean} connected false while the client reconnects: a live answer is paused
 */
export function answer(view, model, actions, connected) {
  const live = view.status === "running" || view.status === "awaiting_approval";
  const body = h("div", { class: "answer" });
  for (const part of view.parts) {
    if (part.kind === "tool") body.append(toolCard(view, part, actions));
    else if (part.kind === "text") body.append(h("div", { class: "part-text markdown" }, markdownOf(part)));
    else body.append(h("details", { class: "reasoning" }, h("summary", {}, "Reasoning"), h("div", {}, part.text)));
  }
  if (live && view.parts.length === 0) body.append(h("div", { class: "typing" }, h("i"), h("i"), h("i")));
  else if (live) body.lastElementChild?.classList.add("streaming");
  if (view.steps.length > 0) body.append(stepList(view.steps));
  if (view.error !== null) body.append(h("div", { class: "note error" }, icon("warn"), view.error));
  if (view.note !== null) body.append(h("div", { class: "note" }, view.note));
  const paused = live && !connected;
  const label = paused ? "Reconnecting" : STATUS_LABELS[view.status];
  const meta = h(
    "div",
    { class: "meta" },
    h("span", { class: "model" }, model),
    label ? h("span", { class: `chip chip-${paused ? "paused" : view.status}` }, label) : null,
    view.seq > 0 ? h("span", { class: "seq", title: "The last log entry shown; a resume starts right after it" }, `seq ${view.seq}`) : null,
    view.resumedAt > 0 && live ? h("span", { class: "seq resumed" }, `resumed after seq ${view.resumedAt}`) : null,
  );
  body.append(meta);
  return h(
    "article",
    { class: "msg assistant", "data-job-id": view.jobId, "data-status": view.status, "data-seq": String(view.seq) },
    avatar(),
    body,
  );
}

/**
 * Make `old` (an answer on the page) look like `fresh` (the same answer drawn again), keeping
 * the nodes that did not change: while an answer streams only its growing end is replaced, so
 * finished paragraphs, an opened Reasoning and a selection stay as they are.
 * @param {Element} old
 * @param {Element} fresh
 */
export function patchAnswer(old, fresh) {
  for (const { name } of Array.from(old.attributes)) if (!fresh.hasAttribute(name)) old.removeAttribute(name);
  for (const { name, value } of Array.from(fresh.attributes)) if (old.getAttribute(name) !== value) old.setAttribute(name, value);
  const before = Array.from(old.childNodes);
  const after = Array.from(fresh.childNodes);
  after.forEach((node, i) => {
    const prev = before[i];
    if (prev === undefined) {
      old.append(node);
      return;
    }
    if (prev instanceof HTMLDetailsElement && node instanceof HTMLDetailsElement) node.open = prev.open;
    if (prev.isEqualNode(node)) return;
    const descend = prev instanceof Element && node instanceof Element && prev.tagName === node.tagName &&
      (node.classList.contains("answer") || node.classList.contains("part-text"));
    if (descend) patchAnswer(prev, node);
    else prev.replaceWith(node);
  });
  for (const extra of before.slice(after.length)) extra.remove();
}

/**
 * @param {JobView} view
 * @param {ToolPart} part
 * @param {AnswerActions} actions
 */
function toolCard(view, part, actions) {
  const waiting = view.status === "awaiting_approval" && part.output === null;
  const state = part.approval === "pending" ? "pending" : waiting ? "waiting" : part.output === null ? "running" : part.isError ? "error" : "done";
  const card = h(
    "div",
    { class: `tool tool-${state}`, "data-call-id": part.callId, "data-tool": part.name },
    h("div", { class: "tool-head" }, icon("tool"), h("code", { class: "tool-name" }, part.name), h("code", { class: "tool-args" }, formatArguments(part.arguments))),
  );
  if (part.approval === "pending") {
    const approve = h("button", { class: "button primary small", type: "button", "data-action": "approve" }, "Approve");
    const deny = h("button", { class: "button ghost small", type: "button", "data-action": "deny" }, "Deny");
    const decide = (/** @type {boolean} */ approved) => {
      approve.setAttribute("disabled", "");
      deny.setAttribute("disabled", "");
      actions.approve(view.jobId, part.callId, approved);
    };
    approve.addEventListener("click", () => decide(true));
    deny.addEventListener("click", () => decide(false));
    card.append(
      h("div", { class: "approval" }, icon("hand"), h("span", {}, `${part.name} needs your approval to run.`), h("span", { class: "spacer" }), deny, approve),
    );
  } else if (part.approval !== null) {
    card.append(h("div", { class: `decision ${part.approval}` }, part.approval === "approved" ? "Approved" : "Denied"));
  }
  if (part.output !== null) card.append(h("pre", { class: "tool-output" }, part.output));
  return card;
}

/**
 * A workflow's steps under its answer: each with its name, status and summary.
 * @param {import("./state.js").WorkflowStep[]} steps
 */
function stepList(steps) {
  return h(
    "ol",
    { class: "steps", "aria-label": "Workflow steps" },
    ...steps.map((step) =>
      h(
        "li",
        { class: `step step-${step.status}`, "data-step": String(step.step), "data-status": step.status },
        h("span", { class: "step-mark" }, step.status === "running" ? "…" : step.status === "failed" ? "✕" : "✓"),
        h("code", { class: "step-name" }, step.name),
        h("span", { class: "step-summary" }, step.summary),
      ),
    ),
  );
}

/** @param {string} text */
function formatArguments(text) {
  try {
    const value = JSON.parse(text || "{}");
    if (value && typeof value === "object" && !Array.isArray(value)) {
      return Object.entries(value).map(([key, v]) => `${key}: ${JSON.stringify(v)}`).join(", ");
    }
  } catch {
    // shown as sent
  }
  return text;
}

/**
 * The empty state of a thread, with suggestions.
 * @param {Array<{ title: string, text: string, model: string, hint: string }>} suggestions
 * @param {(s: { title: string, text: string, model: string, hint: string }) => void} pick
 */
export function emptyState(suggestions, pick) {
  const cards = suggestions.map((suggestion) => {
    const card = h(
      "button",
      { class: "suggestion", type: "button", "data-model": suggestion.model },
      h("span", { class: "suggestion-title" }, suggestion.title),
      h("span", { class: "suggestion-hint" }, suggestion.hint),
      h("span", { class: "suggestion-model" }, suggestion.model),
    );
    card.addEventListener("click", () => pick(suggestion));
    return card;
  });
  return h(
    "div",
    { class: "empty" },
    h("h2", {}, "Answers that keep going"),
    h("p", {}, "Each answer runs on the server as a background job. Switch threads, reload, lose the network: it keeps streaming, and you pick up exactly where you left off."),
    h("div", { class: "suggestions" }, ...cards),
  );
}

/**
 * The list in the notifications panel.
 * @param {Notification[]} notifications
 * @param {(n: Notification) => void} open
 * @param {(threadId: string) => string} threadTitle
 */
export function notificationItems(notifications, open, threadTitle) {
  if (notifications.length === 0) return [h("div", { class: "panel-empty" }, "Nothing yet. Answers that finish while you look elsewhere show up here.")];
  return notifications.map((n) => {
    const item = h(
      "button",
      { class: `notification ${n.read ? "read" : "unread"} kind-${kindOf(n)}`, type: "button", "data-notification-id": n.notification_id },
      icon(kindOf(n) === "warning" ? "warn" : kindOf(n) === "approval" ? "hand" : "check"),
      h(
        "span",
        { class: "notification-text" },
        h("span", { class: "notification-title" }, `${n.title} · ${threadTitle(n.thread_id)}`),
        h("span", { class: "notification-body" }, n.body),
        h("time", { datetime: n.created_at }, new Date(n.created_at).toLocaleTimeString()),
      ),
    );
    item.addEventListener("click", () => open(n));
    return item;
  });
}

/** @param {Notification} n */
export function kindOf(n) {
  return n.type === "system.warning" ? "warning" : n.type === "ai.tool.approval_required" ? "approval" : "success";
}

/**
 * Show a toast for a notification; it goes away after a while or when clicked.
 * @param {HTMLElement} container
 * @param {Notification} n
 * @param {string} threadTitle
 * @param {() => void} open
 */
export function showToast(container, n, threadTitle, open) {
  const kind = kindOf(n);
  const close = h("button", { class: "toast-close", type: "button", "aria-label": "Dismiss" }, "×");
  const toast = h(
    "div",
    { class: `toast toast-${kind}`, role: "status", "data-type": n.type, "data-thread-id": n.thread_id },
    icon(kind === "warning" ? "warn" : kind === "approval" ? "hand" : "check"),
    h("div", { class: "toast-text" }, h("strong", {}, n.title), h("span", { class: "toast-thread" }, threadTitle), h("span", { class: "toast-body" }, n.body)),
    close,
  );
  const dismiss = () => {
    toast.classList.add("leaving");
    setTimeout(() => toast.remove(), 200);
  };
  toast.addEventListener("click", (event) => {
    dismiss();
    if (event.target !== close) open();
  });
  container.prepend(toast);
  while (container.children.length > 4) container.lastElementChild?.remove();
  setTimeout(dismiss, 7000);
}
