// Compiled (never run) against the package's emitted declarations by `npm run check`: the
// types a TypeScript app sees are the protocol's messages, and misuse does not compile.
import {
  type Client,
  type JobEventsMessage,
  type Notification,
  CapacityError,
  GoneError,
  batchText,
  connect,
} from "backstream-client";

export async function example(): Promise<string> {
  const client: Client = await connect("ws://127.0.0.1:8765/v1", { getToken: async ({ refresh }) => (refresh ? "new" : "old") });
  const started = await client.startJob({ threadId: "t1", messageId: "m1", model: "backstream/echo", messages: [{ role: "user", content: "hi" }] });
  const jobId: string = started.job.job_id;
  let text = "";
  try {
    for await (const batch of client.watch(jobId, { afterSeq: 0 })) {
      const typed: JobEventsMessage = batch;
      text += batchText(typed);
      for (const event of batch.events) {
        if (event.kind === "tool_call") text += event.arguments;
        if (event.kind === "status" && event.error !== null) text += event.error.message;
      }
    }
  } catch (error) {
    if (error instanceof GoneError) return (await client.getJob(jobId, { includeContent: true })).content ?? "";
    if (error instanceof CapacityError) return String(error.retryAfterMs);
    throw error;
  }
  const stop = client.onNotification((n: Notification) => n.type === "ai.message.received");
  stop();
  // @ts-expect-error: options are camelCase
  await client.getJob(jobId, { include_content: true });
  // @ts-expect-error: approve needs a decision
  await client.approve(jobId, "call_1");
  await client.close();
  return text;
}
