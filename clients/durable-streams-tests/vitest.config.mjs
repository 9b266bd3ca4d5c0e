// Runs the Durable Streams server conformance suite (what its CLI would run: the CLI itself
// finds no test file when installed from npm) against CONFORMANCE_TEST_URL.
import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["node_modules/@durable-streams/server-conformance-tests/dist/test-runner.js"],
    exclude: [],
    passWithNoTests: false,
  },
})
