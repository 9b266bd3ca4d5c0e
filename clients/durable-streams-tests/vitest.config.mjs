// Runs the Durable Streams server conformance suite (what its CLI would run: the CLI itself
// finds no test file when installed from npm) against CONFORMANCE_TEST_URL.
import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["node_modules/@durable-streams/server-conformance-tests/dist/test-runner.js"],
    exclude: [],
    passWithNoTests: false,
    // Its property-based tests run hundreds of requests each: on two cores shared with the
    // rest of our suite, over a Redis Cluster, vitest's 5 s per test is too short.
    testTimeout: 30_000,
  },
})
