// The Node reference server (@durable-streams/server), for bench/durable_streams.py: in memory,
// or file-backed with DATA_DIR. Prints its URL on stdout, serves until killed.
import { DurableStreamTestServer } from "@durable-streams/server"

const server = new DurableStreamTestServer({
  port: Number(process.env.PORT ?? 0),
  host: "127.0.0.1",
  longPollTimeout: 20_000,
  compression: false,
  ...(process.env.DATA_DIR ? { dataDir: process.env.DATA_DIR } : {}),
})
const url = await server.start()
console.log(url)
