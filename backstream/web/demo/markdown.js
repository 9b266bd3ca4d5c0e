// Answers as Markdown: parsed by marked, then sanitized by DOMPurify before anything reaches
// the DOM (a model's answer is untrusted: it may carry <script>, onerror=, javascript: links),
// allowing only the elements and attributes Markdown makes and only http(s)/mailto links.
// Both are the pinned npm packages' browser builds, copied into vendor/ by
// clients/js/scripts/vendor-demo.mjs.

import DOMPurify from "./vendor/purify.es.js";
import { Marked } from "./vendor/marked.esm.js";

/** @param {string} text */
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// HTML written in an answer is shown as the text it is, never parsed: a chat shows what the model
// wrote. (Parsing it, even in DOMPurify's inert document, makes the page's CSP log each handler.)
const parser = new Marked({ gfm: true, breaks: false, async: false, renderer: { html: ({ text }) => escapeHtml(text) } });

/** What may come out: formatting, code, lists, tables, links; no forms, media, styles or frames. */
const ALLOWED_TAGS = [
  "p", "br", "hr", "strong", "em", "del", "code", "pre", "blockquote",
  "ul", "ol", "li", "input", "h1", "h2", "h3", "h4", "h5", "h6",
  "table", "thead", "tbody", "tr", "th", "td", "a",
];
const ALLOWED_ATTR = ["href", "title", "start", "align", "type", "checked", "disabled", "class"];

// Links leave the page in a new tab, and never tell the other site where they came from.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
  if (node.tagName === "INPUT" && node.getAttribute("type") !== "checkbox") node.remove();
});

/**
 * The Markdown `text` as sanitized nodes.
 * @param {string} text
 * @returns {DocumentFragment}
 */
export function markdown(text) {
  const html = /** @type {string} */ (parser.parse(text));
  return DOMPurify.sanitize(html, {
    ALLOWED_TAGS,
    ALLOWED_ATTR,
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
    RETURN_DOM_FRAGMENT: true,
  });
}

/** The fragment last made for each text part: a finished part is parsed once, not per batch. */
const made = /** @type {WeakMap<object, { text: string, nodes: DocumentFragment }>} */ (new WeakMap());

/**
 * A text part's nodes, from the cache while its text has not changed. A streaming part is
 * parsed again as it grows; the page renders at most once a frame, so that stays bounded.
 * @param {{ text: string }} part
 * @returns {DocumentFragment} a copy: the cached fragment stays whole
 */
export function markdownOf(part) {
  let entry = made.get(part);
  if (entry === undefined || entry.text !== part.text) {
    entry = { text: part.text, nodes: markdown(part.text) };
    made.set(part, entry);
  }
  return /** @type {DocumentFragment} */ (entry.nodes.cloneNode(true));
}
