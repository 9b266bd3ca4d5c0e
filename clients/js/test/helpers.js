// Real parts for the tests: a `backstream serve` subprocess, a TCP proxy that can drop its
// connections as a network would, HS256 JWTs.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after } from "node:test";
import { fileURLToPath } from "node:url";
import { joinContent } from "../src/backstream-client.js";

export const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const PYTHON = process.env.BACKSTREAM_PYTHON ?? join(REPO, ".venv", "bin", "python");

/** Servers still running: a test that failed before stopping its server must not keep the file's process alive. */
const running = /** @type {Set<import("node:child_process").ChildProcess>} */ (new Set());
after(() => {
  for (const proc of running) proc.kill("SIGKILL");
});

/** @returns {Promise<number>} a port nothing listens on now */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = /** @type {net.AddressInfo} */ (server.address());
      server.close(() => resolve(port));
    });
  });
}

/**
 * A free port below the kernel's ephemeral range (32768 and up by default), for a server
 * that must get it back after a restart: a port the kernel hands out for outgoing
 * connections may be some connection's own in between.
 * @returns {Promise<number>}
 */
export async function stablePort() {
  for (let tries = 0; tries < 200; tries++) {
    const port = 20_000 + Math.floor(Math.random() * 12_768);
    const free = await new Promise((resolve) => {
      const server = net.createServer();
      server.once("error", () => resolve(false));
      server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)));
    });
    if (free) return port;
  }
  return freePort();
}

/** @param {number} ms */
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * @param {number} port
 * @param {number} [timeoutMs]
 */
export async function waitForPort(port, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const open = await new Promise((resolve) => {
      const socket = net.connect(port, "127.0.0.1");
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
    if (open) return;
    await sleep(50);
  }
  throw new Error(`nothing listens on ${port}`);
}

/**
 * A `backstream serve` process. Ports are picked once, so `restart()` comes back on the same.
 * @param {{ args?: string[], env?: Record<string, string>, store?: string, web?: boolean }} [options]
 */
export async function startServer(options = {}) {
  const port = await stablePort();
  const httpPort = await stablePort();
  const store = options.store ?? `sqlite:///${mkdtempSync(join(tmpdir(), "backstream-js-"))}/jobs.db`;
  const args = [
    "-m", "backstream", "serve",
    "--port", String(port), "--http-port", String(httpPort),
    "--store", store, "--log-level", "warning", "--drain-timeout", "0",
    ...(options.web ? ["--web"] : []),
    ...(options.args ?? []),
  ];
  /** @type {import("node:child_process").ChildProcess} */
  let proc;
  let log = "";
  const launch = async () => {
    proc = spawn(PYTHON, args, { env: { ...process.env, ...options.env }, stdio: ["ignore", "ignore", "pipe"] });
    const started = proc;
    running.add(started);
    started.once("exit", () => running.delete(started));
    proc.stderr?.on("data", (chunk) => {
      log = (log + chunk).slice(-20_000);
    });
    try {
      // A start under a full test run (coverage, other servers) can take many seconds.
      await waitForPort(port, 45_000);
      await waitForPort(httpPort, 45_000);
    } catch (error) {
      const status = started.exitCode ?? started.signalCode ?? "still running";
      throw new Error(`${/** @type {Error} */ (error).message} (serve: ${status}; its log: ${log.slice(-2000)})`);
    }
  };
  await launch();
  const exited = () => new Promise((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) resolve(undefined);
    else proc.once("exit", () => resolve(undefined));
  });
  return {
    port,
    httpPort,
    url: `ws://127.0.0.1:${port}/v1`,
    http: `http://127.0.0.1:${httpPort}`,
    log: () => log,
    /** SIGTERM (a graceful stop: clients get 1001) or SIGKILL, and wait for the exit (SIGKILL after 20 s). */
    stop: async (/** @type {NodeJS.Signals} */ signal = "SIGTERM") => {
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
      await exited();
      clearTimeout(timer);
    },
    restart: launch,
  };
}

/**
 * A TCP proxy in front of `targetPort`. `cut()` destroys every connection (the client sees
 * the socket drop, with no close frame); `refuse` makes it drop new connections at once;
 * `blackhole` makes it swallow what the client sends.
 * @param {number} targetPort
 */
export async function startProxy(targetPort) {
  /** @type {Set<net.Socket>} */
  const sockets = new Set();
  const state = { refuse: false, blackhole: false, accepted: 0 };
  const server = net.createServer((client) => {
    if (state.refuse) {
      client.destroy();
      return;
    }
    state.accepted += 1;
    const upstream = net.connect(targetPort, "127.0.0.1");
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on("close", () => sockets.delete(socket));
      socket.on("error", () => {});
    }
    client.on("data", (data) => {
      if (!state.blackhole) upstream.write(data);
    });
    upstream.pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(undefined)));
  const { port } = /** @type {net.AddressInfo} */ (server.address());
  return {
    port,
    url: `ws://127.0.0.1:${port}/v1`,
    state,
    cut: () => {
      for (const socket of sockets) socket.destroy();
    },
    close: () => {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(() => resolve(undefined)));
    },
  };
}

/**
 * An HS256 JWT for `sub` that expires `ttlSeconds` from now.
 * @param {string} secret
 * @param {string} sub
 * @param {number} ttlSeconds
 */
export function mintJwt(secret, sub, ttlSeconds) {
  const encode = (/** @type {object} */ value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${encode({ alg: "HS256", typ: "JWT" })}.${encode({ sub, exp: Math.floor(Date.now() / 1000) + ttlSeconds })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/**
 * Read a watch to its end: the batches, their joined text, the final status.
 * @param {AsyncIterable<import("../src/backstream-client.js").JobEventsMessage>} watch
 * @param {(batch: import("../src/backstream-client.js").JobEventsMessage, index: number) => unknown} [each]
 */
export async function collect(watch, each) {
  /** @type {import("../src/backstream-client.js").JobEventsMessage[]} */
  const batches = [];
  let text = "";
  for await (const batch of watch) {
    batches.push(batch);
    text = joinContent(text, batch);
    await each?.(batch, batches.length - 1);
  }
  const last = batches.at(-1)?.events.at(-1);
  return { batches, text, status: last?.kind === "status" ? last.status : null };
}

/**
 * Each batch starts right after the one before, from `afterSeq + 1`.
 * @param {Array<{ from_seq: number, to_seq: number }>} batches
 * @param {number} [afterSeq]
 */
export function contiguous(batches, afterSeq = 0) {
  let next = afterSeq + 1;
  for (const batch of batches) {
    if (batch.from_seq === batch.to_seq + 1 && batch.to_seq < next) {
      next = batch.from_seq; // a watch's cut back to what the log kept after a takeover
      continue;
    }
    if (batch.from_seq !== next) return false;
    next = batch.to_seq + 1;
  }
  return true;
}

export const LOREM = [{ role: "user", content: "Tell me something long." }];
