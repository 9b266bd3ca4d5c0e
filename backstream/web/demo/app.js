// The demo chat page's controller: threads whose answers run as backstream jobs. It watches
// only the open thread's jobs; an answer that ends while its thread is not open comes back as a
// notification.

import { CapacityError, GoneError, NotFoundError } from "../client/backstream-client.js";
import * as render from "./render.js";
import * as state from "./state.js";

/** @typedef {import("../client/backstream-client.js").Client} Client */
/** @typedef {import("../client/backstream-client.js").Notification} Notification */
/** @typedef {import("../client/backstream-client.js").ConnectionState} ConnectionState */
/** @typedef {import("./state.js").JobView} JobView */
/** @typedef {import("./state.js").Thread} Thread */
/** @typedef {import("./state.js").Turn} Turn */
/** @typedef {{ id: string, builtin: boolean }} ModelInfo */

const SUGGESTIONS = [
  {
    title: "Tell me something long",
    hint: "A long answer: switch threads or reload while it streams.",
    text: "Tell me something long.",
    model: "backstream/lorem",
  },
  {
    title: "What is 1337 * 42, and what time is it? Then send a note to Ada.",
    hint: "Tool calls inline, and an approval prompt.",
    text: "What is 1337 * 42, and what time is it? Then send a note to Ada.",
    model: "backstream/tools-demo",
  },
  {
    title: "Run the demo workflow",
    hint: "A plan, two tools, your approval and a summary, each step listed under the answer.",
    text: "Compute 6*7 and tell me the time.",
    model: "workflow/demo",
  },
  {
    title: "Echo this back to me, word by word",
    hint: "The echo model repeats your message.",
    text: "Echo this back to me, word by word, so I can watch it stream.",
    model: "backstream/echo",
  },
];
const HISTORY_TURNS = 20;
const BACKGROUND_POLL_MS = 4000;

/**
 * @template {HTMLElement} T
 * @param {string} id
 * @returns {T}
 */
export function $(id) {
  return /** @type {T} */ (document.getElementById(id));
}

export class ChatApp {
  /** @type {Map<string, JobView>} */
  views = new Map();
  /** @type {Notification[]} */
  notifications = [];
  unread = 0;
  /** @type {string | null} */
  activeId = null;
  /** @type {ReturnType<typeof setTimeout> | null} */
  poll = null;
  /** Answers to draw at the next frame: a fast stream is drawn once a frame, not per batch. */
  dirty = /** @type {Set<JobView>} */ (new Set());
  frame = 0;

  /**
   * @param {Client} client
   * @param {ModelInfo[]} models
   * @param {string | null} upstreamError
   */
  constructor(client, models, upstreamError) {
    this.client = client;
    this.user = client.user;
    this.models = models;
    this.upstreamError = upstreamError;
    this.threads = state.loadThreads(this.user);
  }

  run() {
    $("app").hidden = false;
    $("signin").hidden = true;
    $("user-name").textContent = this.user;
    this.setupComposer();
    $("new-thread").addEventListener("click", () => this.newThread());
    $("menu").addEventListener("click", () => {
      const open = !$("app").classList.contains("drawer-open");
      this.setDrawer(open);
      if (open) $("new-thread").focus();
    });
    $("scrim").addEventListener("click", () => this.setDrawer(false));
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape") return;
      if ($("app").classList.contains("drawer-open")) $("menu").focus();
      this.setDrawer(false);
      this.setPanel(false);
    });
    $("mute").addEventListener("click", () => this.toggleMute());
    $("bell").addEventListener("click", () => this.togglePanel());
    $("mark-all-read").addEventListener("click", () => this.markAllRead());
    $("sign-out").addEventListener("click", () => {
      state.saveToken(null);
      location.reload();
    });
    document.addEventListener("click", (event) => {
      const panel = $("panel");
      if (!panel.hidden && !panel.contains(/** @type {Node} */ (event.target)) && !$("bell").contains(/** @type {Node} */ (event.target))) this.setPanel(false);
    });
    this.client.onStateChange((s) => this.showConnection(s));
    $("connection").addEventListener("click", () => {
      if (this.client.state === "offline") this.client.ping().catch(() => {});
    });
    this.client.onNotification((n) => this.onNotification(n));
    this.showConnection(this.client.state);
    const saved = state.loadSetting("active");
    const first = this.threads.find((t) => t.id === saved) ?? this.threads[0];
    if (first) this.open(first.id);
    else this.newThread();
    for (const thread of this.threads) {
      for (const turn of thread.turns) if (turn.jobId === null && turn.error === null) this.start(thread, turn);
    }
    this.refreshNotifications();
    this.refreshBackground();
  }

  // -- threads ---------------------------------------------------------------------------------

  /** @param {string} id */
  thread(id) {
    return this.threads.find((t) => t.id === id) ?? null;
  }

  active() {
    return this.activeId === null ? null : this.thread(this.activeId);
  }

  newThread() {
    const empty = this.threads.find((t) => t.turns.length === 0);
    if (empty !== undefined) {
      this.setDrawer(false);
      if (empty.id !== this.activeId) this.open(empty.id);
      $("prompt").focus();
      return;
    }
    const thread = { id: state.newId("t"), title: "New chat", updatedAt: Date.now(), muted: false, turns: [] };
    this.threads.unshift(thread);
    this.save();
    this.open(thread.id);
  }

  /**
   * Show a thread: stop watching the jobs of the one left (they go on on the server) and
   * watch this one's, each from the last seq the page has.
   * @param {string} id
   */
  open(id) {
    const thread = this.thread(id);
    if (thread === null) return;
    const keep = new Set(thread.turns.map((t) => t.jobId));
    for (const view of this.views.values()) {
      if (view.watch !== null && !keep.has(view.jobId)) {
        view.watch.close();
        view.watch = null;
      }
    }
    this.activeId = id;
    state.saveSetting("active", id);
    this.setDrawer(false);
    this.showModel(thread);
    this.renderThread();
    for (const turn of thread.turns) if (turn.jobId !== null) this.follow(this.view(turn.jobId));
    this.markThreadRead(id);
    this.renderThreads();
    $("prompt").focus();
  }

  async toggleMute() {
    const thread = this.active();
    if (thread === null) return;
    try {
      const result = await this.client.muteThread(thread.id, !thread.muted);
      thread.muted = result.muted;
      this.save();
      this.renderHeader();
      this.renderThreads();
    } catch (error) {
      this.flash(`Could not change the thread: ${errorText(error)}`);
    }
  }

  save() {
    state.saveThreads(this.user, this.threads);
  }

  // -- jobs ------------------------------------------------------------------------------------

  /** @param {string} jobId */
  view(jobId) {
    let view = this.views.get(jobId);
    if (view === undefined) {
      view = state.restoreView(jobId);
      this.views.set(jobId, view);
    }
    return view;
  }

  /** @param {string} text */
  async send(text) {
    const thread = this.active();
    if (thread === null || !text.trim() || this.isRunning(thread)) return;
    const model = /** @type {HTMLSelectElement} */ ($("model")).value;
    thread.model = model;
    /** @type {Turn} */
    const turn = { messageId: state.newId("m"), text: text.trim(), model, jobId: null, error: null };
    if (thread.turns.length === 0) thread.title = turn.text.length > 48 ? `${turn.text.slice(0, 47)}…` : turn.text;
    thread.turns.push(turn);
    thread.updatedAt = Date.now();
    this.save();
    this.renderThread();
    this.renderThreads();
    await this.start(thread, turn);
  }

  /**
   * Start (or, after a reload, find again: the server knows the message id) the turn's job.
   * @param {Thread} thread
   * @param {Turn} turn
   */
  async start(thread, turn) {
    const index = thread.turns.indexOf(turn);
    /** @type {Array<Record<string, unknown>>} */
    const messages = [];
    for (const earlier of thread.turns.slice(Math.max(0, index - HISTORY_TURNS), index)) {
      messages.push({ role: "user", content: earlier.text });
      const said = earlier.jobId === null ? "" : state.viewText(this.views.get(earlier.jobId));
      if (said) messages.push({ role: "assistant", content: said });
    }
    messages.push({ role: "user", content: turn.text });
    const tools = /** @type {HTMLInputElement} */ ($("tools")).checked ? this.client.welcome?.features.tools ?? [] : [];
    try {
      const started = await this.client.startJob({ threadId: thread.id, messageId: turn.messageId, model: turn.model, messages, tools });
      turn.jobId = started.job.job_id;
      turn.error = null;
    } catch (error) {
      turn.error = error instanceof CapacityError
        ? `Too many answers are running right now; try again in ${Math.ceil((error.retryAfterMs ?? 1000) / 1000)} s.`
        : `The answer could not be started: ${errorText(error)}`;
    }
    this.save();
    if (thread.id === this.activeId) {
      this.renderThread();
      if (turn.jobId !== null) this.follow(this.view(turn.jobId));
    }
    this.renderThreads();
  }

  /**
   * Watch a job from the view's seq and fold its batches in, until it ends or the thread is
   * left. Nothing the view shows is received twice, and nothing is skipped.
   * @param {JobView} view
   * @param {boolean} [afterGone]
   */
  async follow(view, afterGone = false) {
    if (view.watch !== null || state.TERMINAL.has(view.status) || view.status === "missing") return;
    const watch = this.client.watch(view.jobId, { afterSeq: view.seq, epoch: view.epoch });
    view.watch = watch;
    view.resumedAt = view.seq;
    try {
      for await (const batch of watch) {
        state.applyBatch(view, batch);
        state.persistView(view);
        this.renderSoon(view);
      }
    } catch (error) {
      if (error instanceof GoneError && !afterGone) {
        // The server recovered the job after a crash: what we had may not continue its log.
        Object.assign(view, { seq: 0, epoch: null, parts: [], status: "unknown", watch: null });
        view.note = "The server restarted while this answer was running; it was reloaded.";
        state.persistView(view);
        this.follow(view, true);
        return;
      }
      if (error instanceof NotFoundError) {
        view.status = "missing";
        view.error = "This answer is no longer kept on the server.";
      } else {
        view.error = `The answer's stream stopped: ${errorText(error)}`;
      }
    } finally {
      if (view.watch === watch) view.watch = null;
    }
    this.renderJob(view);
    this.renderThreads();
  }

  /** @param {Thread} thread */
  isRunning(thread) {
    const last = thread.turns[thread.turns.length - 1];
    if (last === undefined) return false;
    if (last.jobId === null) return last.error === null;
    const view = this.view(last.jobId);
    const status = view.watch !== null || state.TERMINAL.has(view.status) ? view.status : view.remote ?? view.status;
    return status === "running" || status === "awaiting_approval" || (status === "unknown" && view.watch !== null);
  }

  /**
   * Which jobs of threads not open still run (the page does not watch them): asked again
   * while any does, so the sidebar's dots go out.
   */
  async refreshBackground() {
    if (this.poll !== null) clearTimeout(this.poll);
    this.poll = null;
    try {
      const { jobs } = await this.client.listJobs({ status: ["running", "awaiting_approval"], limit: 200 });
      const running = new Map(jobs.map((job) => [job.job_id, job.status]));
      for (const thread of this.threads) {
        for (const turn of thread.turns) {
          if (turn.jobId !== null) this.view(turn.jobId).remote = running.get(turn.jobId) ?? "completed";
        }
      }
      this.renderThreads();
      if (this.threads.some((t) => t.id !== this.activeId && this.isRunning(t))) {
        this.poll = setTimeout(() => this.refreshBackground(), BACKGROUND_POLL_MS);
      }
    } catch {
      this.poll = setTimeout(() => this.refreshBackground(), BACKGROUND_POLL_MS);
    }
  }

  /**
   * @param {string} jobId
   * @param {string} callId
   * @param {boolean} approved
   */
  async approve(jobId, callId, approved) {
    try {
      await this.client.approve(jobId, callId, approved);
    } catch (error) {
      this.flash(`The decision was not taken: ${errorText(error)}`);
      this.renderJob(this.view(jobId));
    }
  }

  async stop() {
    const thread = this.active();
    const last = thread?.turns[thread.turns.length - 1];
    if (!last?.jobId) return;
    try {
      await this.client.abort(last.jobId);
    } catch (error) {
      this.flash(`Could not stop the answer: ${errorText(error)}`);
    }
  }

  // -- notifications ---------------------------------------------------------------------------

  /** @param {Notification} n */
  onNotification(n) {
    const view = this.views.get(n.job_id);
    if (view !== undefined) view.remote = n.type === "ai.tool.approval_required" ? "awaiting_approval" : "completed";
    if (n.thread_id === this.activeId && document.visibilityState === "visible") {
      this.client.markNotificationsRead({ ids: [n.notification_id] }).catch(() => {});
      return;
    }
    this.notifications.unshift(n);
    this.notifications.splice(50);
    this.unread += 1;
    const thread = this.thread(n.thread_id);
    render.showToast($("toasts"), n, thread?.title ?? "another device", () => {
      if (thread !== null) this.open(thread.id);
    });
    this.renderNotifications();
    this.renderThreads();
  }

  async refreshNotifications() {
    try {
      const result = await this.client.listNotifications({ limit: 50 });
      this.notifications = result.notifications;
      this.unread = result.unread;
      if (this.activeId !== null) await this.markThreadRead(this.activeId);
      this.renderNotifications();
      this.renderThreads();
    } catch {
      // The badge shows what arrives from now on.
    }
  }

  /** @param {string} threadId */
  async markThreadRead(threadId) {
    const ids = this.notifications.filter((n) => n.thread_id === threadId && !n.read).map((n) => n.notification_id);
    if (ids.length === 0) return;
    for (const n of this.notifications) if (ids.includes(n.notification_id)) n.read = true;
    this.renderNotifications();
    try {
      this.unread = (await this.client.markNotificationsRead({ ids })).unread;
    } catch {
      return;
    }
    this.renderNotifications();
  }

  async markAllRead() {
    for (const n of this.notifications) n.read = true;
    try {
      this.unread = (await this.client.markNotificationsRead({ all: true })).unread;
    } catch (error) {
      this.flash(`Could not mark them read: ${errorText(error)}`);
    }
    this.renderNotifications();
    this.renderThreads();
  }

  togglePanel() {
    this.setPanel($("panel").hidden);
  }

  /**
   * Open or close the notifications panel; toasts hide while it is open (it lists them).
   * @param {boolean} open
   */
  setPanel(open) {
    $("panel").hidden = !open;
    $("app").classList.toggle("panel-open", open);
  }

  /**
   * Open or close the threads drawer (a phone's sidebar; on a wide screen the sidebar is
   * always there and this only sets a class).
   * @param {boolean} open
   */
  setDrawer(open) {
    $("app").classList.toggle("drawer-open", open);
    $("menu").setAttribute("aria-expanded", String(open));
  }

  // -- rendering -------------------------------------------------------------------------------

  renderThreads() {
    /** @type {Map<string, number>} */
    const unread = new Map();
    for (const n of this.notifications) if (!n.read) unread.set(n.thread_id, (unread.get(n.thread_id) ?? 0) + 1);
    const items = render.threadItems(this.threads, {
      activeId: this.activeId,
      unread,
      running: (thread) => this.isRunning(thread),
      open: (id) => this.open(id),
    });
    $("threads").replaceChildren(...items);
    this.renderComposer();
  }

  renderHeader() {
    const thread = this.active();
    $("thread-title").textContent = thread?.title ?? "";
    const mute = $("mute");
    mute.classList.toggle("on", thread?.muted ?? false);
    mute.setAttribute("aria-pressed", String(thread?.muted ?? false));
    $("mute-label").textContent = thread?.muted ? "Muted" : "Mute";
    mute.title = thread?.muted ? "Notifications for this thread are off" : "Turn off notifications for this thread";
  }

  renderThread() {
    const thread = this.active();
    this.renderHeader();
    const list = $("messages");
    if (thread === null) return;
    if (thread.turns.length === 0) {
      list.replaceChildren(render.emptyState(SUGGESTIONS, (s) => this.pickSuggestion(s)));
      this.renderComposer();
      return;
    }
    /** @type {HTMLElement[]} */
    const items = [];
    for (const turn of thread.turns) {
      items.push(render.userMessage(turn));
      if (turn.jobId !== null) items.push(render.answer(this.view(turn.jobId), turn.model, this.actions(), this.client.state === "open"));
      else if (turn.error !== null) items.push(render.failedStart(turn, this.actions()));
      else items.push(render.pendingAnswer());
    }
    list.replaceChildren(...items);
    list.scrollTop = list.scrollHeight;
    this.renderComposer();
  }

  /** @param {JobView} view */
  renderSoon(view) {
    this.dirty.add(view);
    if (this.frame !== 0) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      const views = [...this.dirty];
      this.dirty.clear();
      for (const dirty of views) this.renderJob(dirty);
    });
  }

  /** @param {JobView} view */
  renderJob(view) {
    const thread = this.active();
    const turn = thread?.turns.find((t) => t.jobId === view.jobId);
    const list = $("messages");
    const old = list.querySelector(`article[data-job-id="${CSS.escape(view.jobId)}"]`);
    if (turn === undefined || old === null) return;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    render.patchAnswer(old, render.answer(view, turn.model, this.actions(), this.client.state === "open"));
    if (atBottom) list.scrollTop = list.scrollHeight;
    this.renderComposer();
  }

  actions() {
    return {
      approve: (/** @type {string} */ jobId, /** @type {string} */ callId, /** @type {boolean} */ ok) => this.approve(jobId, callId, ok),
      retry: (/** @type {Turn} */ turn) => {
        const thread = this.active();
        if (thread === null) return;
        turn.error = null;
        this.renderThread();
        this.start(thread, turn);
      },
    };
  }

  renderComposer() {
    const thread = this.active();
    const running = thread !== null && this.isRunning(thread);
    $("send").hidden = running;
    $("stop").hidden = !running;
  }

  renderNotifications() {
    const badge = $("unread-count");
    badge.textContent = this.unread > 99 ? "99+" : String(this.unread);
    badge.hidden = this.unread === 0;
    $("bell").setAttribute("aria-label", `Notifications, ${this.unread} unread`);
    const items = render.notificationItems(
      this.notifications,
      (n) => {
        this.setPanel(false);
        if (this.thread(n.thread_id) !== null) this.open(n.thread_id);
      },
      (threadId) => this.thread(threadId)?.title ?? "another device",
    );
    $("notification-list").replaceChildren(...items);
  }

  /** @param {ConnectionState} connection */
  showConnection(connection) {
    const pill = $("connection");
    pill.dataset.state = connection;
    pill.textContent = { connecting: "Connecting…", open: "Live", reconnecting: "Reconnecting…", offline: "Offline: retry", closed: "Closed" }[connection];
    pill.title = connection === "offline" ? "The server could not be reached; click to try again" : "";
    for (const turn of this.active()?.turns ?? []) if (turn.jobId !== null) this.renderJob(this.view(turn.jobId));
    if (connection !== "open") return;
    this.refreshNotifications();
    // Watches that failed while the client was offline start again from their last seq.
    for (const turn of this.active()?.turns ?? []) {
      const view = turn.jobId === null ? null : this.view(turn.jobId);
      if (view !== null && view.watch === null && !state.TERMINAL.has(view.status) && view.status !== "missing") {
        view.error = null;
        this.follow(view);
      }
    }
  }

  /** @param {string} message */
  flash(message) {
    const note = $("flash");
    note.textContent = message;
    note.hidden = false;
    setTimeout(() => {
      note.hidden = true;
    }, 5000);
  }

  // -- composer --------------------------------------------------------------------------------

  setupComposer() {
    const select = /** @type {HTMLSelectElement} */ ($("model"));
    const groups = [
      ["Built in, offline", this.models.filter((m) => m.builtin)],
      ["Upstream", this.models.filter((m) => !m.builtin)],
    ];
    for (const [label, models] of /** @type {Array<[string, ModelInfo[]]>} */ (groups)) {
      if (models.length === 0) continue;
      const group = render.h("optgroup", { label });
      for (const model of models) group.append(render.h("option", { value: model.id }, model.id));
      select.append(group);
    }
    if (this.upstreamError !== null) select.title = this.upstreamError;
    const saved = state.loadSetting("model");
    if (typeof saved === "string" && this.models.some((m) => m.id === saved)) select.value = saved;
    const tools = /** @type {HTMLInputElement} */ ($("tools"));
    const names = this.client.welcome?.features.tools ?? [];
    tools.checked = state.loadSetting("tools") === true || select.value === "backstream/tools-demo";
    $("tools-label").title = names.length ? `Tools the server may run: ${names.join(", ")}` : "The server has no tools";
    select.addEventListener("change", () => {
      state.saveSetting("model", select.value);
      this.keepModel(select.value);
      if (select.value === "backstream/tools-demo") tools.checked = true;
    });
    tools.addEventListener("change", () => state.saveSetting("tools", tools.checked));
    const prompt = /** @type {HTMLTextAreaElement} */ ($("prompt"));
    const grow = () => {
      prompt.style.height = "auto";
      prompt.style.height = `${Math.min(prompt.scrollHeight, 200)}px`;
    };
    prompt.addEventListener("input", grow);
    // The placeholder wraps on a narrow screen: the box grows to show all of it.
    window.addEventListener("resize", grow);
    grow();
    prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        /** @type {HTMLFormElement} */ ($("composer")).requestSubmit();
      }
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = prompt.value;
      const thread = this.active();
      if (!text.trim() || thread === null || this.isRunning(thread)) return;
      prompt.value = "";
      grow();
      this.send(text);
    });
    $("stop").addEventListener("click", () => this.stop());
  }

  /**
   * The model picker shows the thread's model: the one it last used or was picked for it
   * (else the last one picked anywhere).
   * @param {Thread} thread
   */
  showModel(thread) {
    const select = /** @type {HTMLSelectElement} */ ($("model"));
    const model = thread.model ?? thread.turns[thread.turns.length - 1]?.model;
    if (model !== undefined && this.models.some((m) => m.id === model)) select.value = model;
  }

  /**
   * Remember `model` as the open thread's.
   * @param {string} model
   */
  keepModel(model) {
    const thread = this.active();
    if (thread === null || thread.model === model) return;
    thread.model = model;
    this.save();
  }

  /** @param {{ text: string, model: string }} suggestion */
  pickSuggestion(suggestion) {
    const select = /** @type {HTMLSelectElement} */ ($("model"));
    if (this.models.some((m) => m.id === suggestion.model)) {
      select.value = suggestion.model;
      this.keepModel(suggestion.model);
    }
    if (suggestion.model === "backstream/tools-demo") /** @type {HTMLInputElement} */ ($("tools")).checked = true;
    this.send(suggestion.text);
  }
}

/** @param {unknown} error */
export function errorText(error) {
  return error instanceof Error ? error.message : String(error);
}
