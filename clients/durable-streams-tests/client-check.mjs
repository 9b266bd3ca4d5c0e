// The official TypeScript client against a backstream server: create a JSON stream, append,
// read it back from the start, then live over SSE while a second append lands. Prints what it
// read as JSON on stdout. Usage: node client-check.mjs STREAM_URL (a capability URL).
import { DurableStream } from "@durable-streams/client"

const url = process.argv[2]
const handle = await DurableStream.create({ url, contentType: "application/json" })
await handle.append(JSON.stringify({ n: 1 }))
await handle.append(JSON.stringify({ n: 2 }))
const caughtUp = await (await handle.stream({ live: false, json: true })).json()

const live = await handle.stream({ live: "sse", json: true })
const seen = []
const done = new Promise((resolve) => {
  const stop = live.subscribeJson(async (batch) => {
    seen.push(...batch.items)
    if (seen.some((item) => item.n === 3)) {
      stop()
      live.cancel()
      resolve()
    }
  })
})
setTimeout(() => handle.append(JSON.stringify({ n: 3 })), 300)
await done
const head = await handle.head()
console.log(JSON.stringify({ caughtUp, live: seen, offset: head.offset }))
