// The demo's chat written with the Vercel AI SDK (useChat from @ai-sdk/react),
// talking to Django through detached_runs.aisdk: docs/aisdk.md walks through it.
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport, lastAssistantMessageIsCompleteWithApprovalResponses } from "ai";
import { StrictMode, useEffect, useMemo, useState } from "react";
import { createRoot } from "react-dom/client";

const csrfToken = () => document.cookie.match(/(?:^|; )csrftoken=([^;]*)/)?.[1] ?? "";

// The transport's error message is the response's body: {"error": "..."}.
const errorText = (error) => {
  try {
    return JSON.parse(error.message).error ?? error.message;
  } catch {
    return error.message; // not the server's (the network's)
  }
};

// The chat id (detached_runs' session key) lives in the address, so that a
// reload shows the same chat.
function chatId() {
  const params = new URLSearchParams(location.search);
  let id = params.get("chat");
  if (!id) {
    id = crypto.randomUUID().replaceAll("-", "").slice(0, 16);
    params.set("chat", id);
    history.replaceState(null, "", `${location.pathname}?${params}`);
  }
  return id;
}

function Chat({ id, initialMessages }) {
  const transport = useMemo(
    () =>
      new DefaultChatTransport({
        api: "/api/chat",
        headers: () => ({ "X-CSRFToken": csrfToken() }),
        // The server keeps the history: send the last message only.
        prepareSendMessagesRequest: ({ id, messages, trigger, messageId }) => ({
          body: { id, messages: messages.slice(-1), trigger, messageId },
        }),
      }),
    [],
  );
  const { messages, sendMessage, status, error, addToolApprovalResponse } = useChat({
    id,
    messages: initialMessages,
    resume: true,
    transport,
    sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses,
  });
  const [prompt, setPrompt] = useState("");

  // useChat's stop() only drops the fetch: the run is detached. This stops it.
  const stopRun = () =>
    fetch(`/api/chat/${id}/stop`, { method: "POST", headers: { "X-CSRFToken": csrfToken() } });

  const answer = (part, approved) => addToolApprovalResponse({ id: part.approval.id, approved });

  return (
    <main>
      <style>{".text { white-space: pre-wrap } li { margin: 0.5em 0 } .user { font-weight: bold }"}</style>
      <h1>detached_runs × AI SDK</h1>
      <p>
        The demo's chat written with <code>useChat</code> from the AI SDK: reload mid-answer, or
        send a prompt with the word "approve". <a href="/">The other demo page</a>.
      </p>
      <ol id="messages">
        {messages.map((message) => (
          <li key={message.id} className={message.role} data-status={message.metadata?.status}>
            {message.parts.map((part, i) => {
              if (part.type === "text") return <span key={i} className="text">{part.text}</span>;
              if (part.type.startsWith("tool-") && part.state === "approval-requested") {
                return (
                  <span key={i} className="question">
                    {part.input?.question ?? `Run ${part.type.slice(5)}?`}
                    <button className="yes" onClick={() => answer(part, true)}>Yes</button>
                    <button className="no" onClick={() => answer(part, false)}>No</button>
                  </span>
                );
              }
              return null;
            })}
            {message.metadata?.status && message.metadata.status !== "done" && (
              <em className="badge"> ({message.metadata.status})</em>
            )}
          </li>
        ))}
      </ol>
      <form
        onSubmit={(event) => {
          event.preventDefault();
          if (prompt.trim()) sendMessage({ text: prompt });
          setPrompt("");
        }}
      >
        <input id="prompt" value={prompt} onChange={(event) => setPrompt(event.target.value)} />
        <button id="send" type="submit">Send</button>
        <button id="stop" type="button" onClick={stopRun}>Stop</button>
      </form>
      <p id="status" data-status={status}>{status}</p>
      {error && <p id="error">{errorText(error)}</p>}
    </main>
  );
}

function App() {
  const id = useMemo(chatId, []);
  const [initial, setInitial] = useState(null);
  useEffect(() => {
    fetch(`/api/chat/${id}/messages`)
      .then((response) => response.json())
      .then((body) => setInitial(body.messages ?? []));
  }, [id]);
  return initial === null ? <p>Loading…</p> : <Chat id={id} initialMessages={initial} />;
}

createRoot(document.getElementById("root")).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
