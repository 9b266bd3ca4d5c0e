// The demo chat page starts here: the server's configuration, the token (from the link's
// fragment, or the one kept from last time, or asked for), then the chat.

import { UnauthorizedError, connect } from "../client/backstream-client.js";
import { $, ChatApp, errorText } from "./app.js";
import * as state from "./state.js";

/** @typedef {import("./app.js").ModelInfo} ModelInfo */
/** @typedef {{ websocket: { port: number, path: string, scheme: string }, models: ModelInfo[],
 *   upstream: { configured: boolean, error: string | null } }} PageConfig */

const BUILTIN = ["backstream/echo", "backstream/lorem", "backstream/tools-demo"];

/** @returns {Promise<PageConfig | null>} */
async function loadConfig() {
  try {
    const response = await fetch("/api/config", { cache: "no-store" });
    return response.ok ? await response.json() : null;
  } catch {
    return null;
  }
}

/** The token the URL carries (`#token=...`), removed from the address bar once read. */
function tokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token !== null) history.replaceState(null, "", location.pathname + location.search);
  return token;
}

/**
 * @param {PageConfig | null} config
 */
function websocketUrl(config) {
  const override = new URLSearchParams(location.search).get("ws");
  if (override) return override;
  const ws = config?.websocket ?? { scheme: "ws", port: 8765, path: "/v1" };
  return `${ws.scheme}://${location.hostname}:${ws.port}${ws.path}`;
}

/**
 * @param {string} url
 * @param {string} token
 * @param {PageConfig | null} config
 */
async function start(url, token, config) {
  $("signin-error").textContent = "";
  try {
    const client = await connect(url, { token, clientName: "backstream-demo-page/0.1" });
    state.saveToken(token);
    const models = config?.models ?? BUILTIN.map((id) => ({ id, builtin: true }));
    new ChatApp(client, models, config?.upstream.error ?? null).run();
  } catch (error) {
    showSignIn(url, config, error instanceof UnauthorizedError ? "That token was refused." : `Cannot reach ${url}: ${errorText(error)}`);
  }
}

/**
 * @param {string} url
 * @param {PageConfig | null} config
 * @param {string} problem
 */
function showSignIn(url, config, problem) {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = problem;
  $("signin-server").textContent = url;
  const form = $("signin-form");
  form.onsubmit = (event) => {
    event.preventDefault();
    const token = /** @type {HTMLInputElement} */ ($("signin-token")).value.trim();
    if (token) start(url, token, config);
  };
  $("signin-token").focus();
}

async function main() {
  const fromUrl = tokenFromFragment();
  const config = await loadConfig();
  const url = websocketUrl(config);
  const token = fromUrl ?? state.loadToken();
  if (token === null) showSignIn(url, config, "");
  else await start(url, token, config);
}

main();
