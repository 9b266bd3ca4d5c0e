// A page on the AI SDK with createDurableChatTransport, in headless Chromium, against a
// backstream server: its app routes (here, as docs/durable-streams.md shows them) start a job
// and hand out a read-only capability URL of the job's stream. The page is reloaded
// mid-answer, resumes, and must show the job's whole answer once.
// Usage: node browser-check.mjs (BACKSTREAM_URL, BACKSTREAM_TOKEN, BACKSTREAM_CHROMIUM set).
import assert from "node:assert/strict"
import { readFile } from "node:fs/promises"
import { createServer } from "node:http"
import { build } from "esbuild"
import { chromium } from "playwright-core"

const BACKSTREAM = process.env.BACKSTREAM_URL
const auth = { Authorization: `Bearer ${process.env.BACKSTREAM_TOKEN}`, "Content-Type": "application/json" }
const CHROMIUM = process.env.BACKSTREAM_CHROMIUM ?? "/usr/bin/chromium"
const latest = new Map() // chat id -> latest job id: the app's own storage

async function streamUrl(jobId) {
  const minted = await fetch(`${BACKSTREAM}/v1/stream-capabilities`, {
    method: "POST",
    headers: auth,
    body: JSON.stringify({ prefix: `jobs/${jobId}`, ttl_s: 3600, write: false }),
  }).then((r) => r.json())
  return `${BACKSTREAM}${minted.path}jobs/${jobId}`
}

async function readJson(request) {
  const chunks = []
  for await (const chunk of request) chunks.push(chunk)
  return JSON.parse(Buffer.concat(chunks).toString())
}

async function chatRoute(request, response) {
  const { id, messages } = await readJson(request)
  const last = messages[messages.length - 1]
  const input = last.parts.filter((p) => p.type === "text").map((p) => p.text).join("")
  const job = await fetch(`${BACKSTREAM}/v1/responses`, {
    method: "POST",
    headers: auth,
    body: JSON.stringify({ model: "backstream/lorem", input, background: true }),
  }).then((r) => r.json())
  latest.set(id, job.id)
  response.writeHead(200, { "content-type": "application/json" })
  response.end(JSON.stringify({ streamUrl: await streamUrl(job.id) }))
}

async function reconnectRoute(chatId, response) {
  const jobId = latest.get(chatId)
  const job = jobId && (await fetch(`${BACKSTREAM}/v1/responses/${jobId}`, { headers: auth }).then((r) => r.json()))
  if (!job || (job.status !== "in_progress" && job.status !== "queued")) {
    response.writeHead(204).end()
    return
  }
  response.writeHead(200, { "content-type": "application/json" })
  response.end(JSON.stringify({ streamUrl: await streamUrl(jobId) }))
}

const script = (
  await build({
    entryPoints: [new URL("./page/app.mjs", import.meta.url).pathname],
    bundle: true,
    format: "esm",
    platform: "browser",
    write: false,
    logLevel: "warning",
  })
).outputFiles[0].text
const html = await readFile(new URL("./page/index.html", import.meta.url), "utf8")
const server = createServer((request, response) => {
  const path = new URL(request.url ?? "/", "http://x").pathname
  const reconnect = /^\/api\/chat\/([^/]+)\/stream$/.exec(path)
  if (path === "/app.js") response.writeHead(200, { "content-type": "text/javascript" }).end(script)
  else if (path === "/") response.writeHead(200, { "content-type": "text/html" }).end(html)
  else if (path === "/api/chat" && request.method === "POST") chatRoute(request, response)
  else if (reconnect && request.method === "GET") reconnectRoute(reconnect[1], response)
  else response.writeHead(404).end()
})
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve))
const origin = `http://127.0.0.1:${server.address().port}`

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
})
try {
  const page = await browser.newPage()
  await page.goto(`${origin}/?chat=durable-chat`)
  await page.waitForFunction('typeof page === "object"')
  void page.evaluate('page.send("write something")').catch(() => {})
  await page.waitForFunction("page.text().trim().split(/\\s+/).length >= 10", null, { timeout: 30000 })
  const partial = await page.evaluate("page.text()")

  await page.reload() // mid-answer: the page and its stream go, the job goes on
  await page.waitForFunction('typeof page === "object"')
  assert.equal(await page.evaluate("page.text()"), "")
  await page.evaluate("page.resume()")
  await page.waitForFunction('page.status() === "ready" && page.text().length > 0', null, { timeout: 60000 })
  const shown = await page.evaluate("page.text()")
  assert.equal(await page.evaluate("page.error()"), "")

  const job = await fetch(`${BACKSTREAM}/v1/responses/${latest.get("durable-chat")}`, { headers: auth }).then((r) =>
    r.json(),
  )
  const stored = job.output[0].content[0].text
  assert.equal(job.status, "completed")
  assert.ok(stored.startsWith(partial.trimEnd()), "the partial answer was a prefix of the stored one")
  assert.equal(shown, stored) // nothing lost, nothing repeated
  console.log(JSON.stringify({ partialWords: partial.trim().split(/\s+/).length, words: shown.split(/\s+/).length }))
} finally {
  await browser.close()
  server.close()
}
