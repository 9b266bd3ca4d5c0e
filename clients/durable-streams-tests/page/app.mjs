// The page of the browser test: a chat built on the AI SDK with the Durable Streams transport
// (@durable-streams/aisdk-transport). Its app's /api/chat starts a backstream job and answers
// with a capability URL of the job's durable stream; the page reads that stream itself.
import { AbstractChat } from "ai"
import { createDurableChatTransport } from "@durable-streams/aisdk-transport"

class PageChatState {
  constructor() {
    this.status = "ready"
    this.error = undefined
    this.messages = []
  }
  pushMessage(message) {
    this.messages = this.messages.concat(message)
    render(this.messages)
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1)
    render(this.messages)
  }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)]
    render(this.messages)
  }
  snapshot(thing) {
    return structuredClone(thing)
  }
}

class PageChat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new PageChatState() })
  }
}

function render(messages) {
  const answer = messages.filter((m) => m.role === "assistant").at(-1)
  const text = (answer?.parts ?? []).map((p) => (p.type === "text" ? p.text : "")).join("")
  document.getElementById("answer").textContent = text
}

const chatId = new URL(location.href).searchParams.get("chat") ?? "chat"
const chat = new PageChat({
  id: chatId,
  transport: createDurableChatTransport({ api: `${location.origin}/api/chat` }),
})

window.page = {
  send: (text) => chat.sendMessage({ text }),
  // What useChat({ resume: true }) does after a reload.
  resume: () => chat.resumeStream(),
  text: () => document.getElementById("answer").textContent ?? "",
  status: () => chat.status,
  error: () => String(chat.error ?? ""),
}
