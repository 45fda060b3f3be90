/**
 * The browser side of django detached_runs, without dependencies: start a run,
 * follow it over Server-Sent Events or a WebSocket (replay, then live), stop it.
 *
 *   const client = new DetachedRuns({ base: "/runs/" });
 *   const run = await client.start("chat-1", "Hello", { onDelta: (text) => out.append(text) });
 *   for await (const event of run) console.log(event.event, event.data);
 *
 * Over SSE the browser's own EventSource reconnects after a drop and sends
 * Last-Event-ID, so the server sends exactly what was missed. A WebSocket does
 * not come back by itself: this module reconnects it with the last id seen.
 */

/** One event of a run's log. @typedef {{ id: string | null, event: string, data: any }} RunEvent */

/**
 * What a run reports. Every callback is optional.
 * @typedef {object} Callbacks
 * @property {(data: { run: string, prompt: string }, event: RunEvent) => void} [onStart]
 *   first event of a run; a replay (after a reload, say) begins with it too
 * @property {(text: string, event: RunEvent) => void} [onDelta] a piece of the answer
 * @property {(name: string, data: any, event: RunEvent) => void} [onEvent] the agent's own events
 * @property {(status: string, data: { status: string, error?: string }) => void} [onDone]
 *   the terminal event: "done", "error", "stopped" or "interrupted"; the stream is closed
 * @property {(error: RunError) => void} [onError] a refusal (404, 403, 429...): the stream is
 *   closed; or, over a WebSocket, a frame the server rejected (the stream goes on)
 * @property {() => void} [onReconnecting] the connection dropped; it is being resumed
 */

/**
 * @typedef {object} Options
 * @property {string} [base] where `detached_runs.urls` is mounted (default "/runs/")
 * @property {string} [wsBase] the WebSocket routes: a path or a ws(s):// URL (default "/ws/runs/")
 * @property {"sse" | "ws"} [transport] default "sse"
 * @property {string[]} [events] the agent's own event types. EventSource delivers only the
 *   types it listens for, so name them here to get them over SSE (a WebSocket gets all).
 * @property {string} [csrfToken] default: the `csrftoken` cookie, read at each request
 */

/**
 * An error the server reported (`{"error": ...}`, a 4xxx close code), or a connection that failed.
 * `status`: the HTTP status (a close code minus 4000); 0 when there was no answer.
 */
export class RunError extends Error {
  /** @param {string} message safe to show a user @param {number} status */
  constructor(message, status) {
    super(message);
    this.name = "RunError";
    this.status = status;
  }
}

/** Messages for the server's close codes, for servers that drop the close reason. */
const REFUSALS = { 4400: "Bad request.", 4403: "Log in first.", 4404: "No such session.",
  4429: "Too many at once; try again later.", 4503: "Unavailable; try again shortly." };

/** @param {string} name */
function cookie(name) {
  const pair = document.cookie.split("; ").find((c) => c.startsWith(`${name}=`));
  return pair ? decodeURIComponent(pair.slice(name.length + 1)) : "";
}

/** @param {Response} response @returns {Promise<RunError>} */
async function errorOf(response) {
  let message = "";
  try { message = (await response.json()).error || ""; } catch { /* not JSON */ }
  return new RunError(message || `The server answered ${response.status}.`, response.status);
}

export class DetachedRuns {
  /** @param {Options} [options] */
  constructor(options = {}) {
    this.base = options.base ?? "/runs/";
    this.wsBase = options.wsBase ?? "/ws/runs/";
    this.transport = options.transport ?? "sse";
    this.events = options.events ?? [];
    this.csrfToken = options.csrfToken;
  }

  /** The URL of a session's endpoint. @param {string} key @param {string} [suffix] */
  url(key, suffix = "") {
    return `${this.base}${encodeURIComponent(key)}/${suffix}`;
  }

  /**
   * Start a run of session `key` (stopping the one in flight) and follow it.
   * Rejects with a `RunError` when the server refuses (bad prompt, 403, 429...).
   * @param {string} key @param {string} prompt @param {Callbacks} [callbacks]
   * @param {{ transport?: "sse" | "ws" }} [options]
   * @returns {Promise<Run>}
   */
  async start(key, prompt, callbacks = {}, options = {}) {
    const transport = options.transport ?? this.transport;
    if (transport === "ws") {
      const run = new Run(this, key, "ws", callbacks, null, prompt);
      await run.started;
      return run;
    }
    await this.request(this.url(key), { prompt });
    return new Run(this, key, "sse", callbacks, null, null);
  }

  /**
   * Follow the session's current run: replay from its start (or after `after`), then live.
   * @param {string} key @param {Callbacks} [callbacks]
   * @param {{ transport?: "sse" | "ws", after?: string | null }} [options]
   * @returns {Run}
   */
  follow(key, callbacks = {}, options = {}) {
    const transport = options.transport ?? this.transport;
    return new Run(this, key, transport, callbacks, options.after ?? null, null);
  }

  /** Stop the session's run in flight: true if one was stopped. @param {string} key */
  async stop(key) {
    return (await this.request(this.url(key, "stop/"), {})).stopped;
  }

  /**
   * GET `url`, or POST `body` to it as JSON; throws a `RunError` unless the answer is 2xx.
   * @param {string} url @param {object} [body]
   */
  async request(url, body) {
    const csrf = this.csrfToken ?? cookie("csrftoken");
    const headers = { "Content-Type": "application/json", "X-CSRFToken": csrf };
    const post = body === undefined ? {} : { method: "POST", headers, body: JSON.stringify(body) };
    let response;
    try {
      response = await fetch(url, { credentials: "same-origin", ...post });
    } catch {
      throw new RunError("The server cannot be reached.", 0);
    }
    if (!response.ok) { throw await errorOf(response); }
    return response.status === 204 ? null : response.json();
  }
}

/**
 * One followed run: callbacks and an async iterator of its events. It ends
 * after `done` (or a refusal). `close()` only lets go: the run goes on on the
 * server. Events are kept for the iterator until it reads them.
 */
export class Run {
  /**
   * @param {DetachedRuns} client @param {string} key @param {"sse" | "ws"} transport
   * @param {Callbacks} callbacks @param {string | null} after @param {string | null} prompt
   */
  constructor(client, key, transport, callbacks, after, prompt) {
    this.client = client;
    this.key = key;
    this.transport = transport;
    this.callbacks = callbacks;
    /** @type {string | null} the run followed: from the last `start` event */
    this.runId = null;
    /** @type {string | null} */
    this.lastEventId = after;
    /** @type {string | null} the terminal status, once there */
    this.status = null;
    /** @type {RunError | null} why the stream ended without `done` */
    this.error = null;
    this.closed = false;
    /** @type {RunEvent[]} */
    this._buffer = [];
    /** The iterator's pending `next()`. @type {{ resolve: Function, reject: Function } | null} */
    this._reader = null;
    /** @type {EventSource | WebSocket | null} */
    this._source = null;
    this._timer = 0;
    this._retries = 0;
    // A WebSocket start: the prompt goes out as a "start" frame once the socket is open.
    this._pending = prompt === null ? null : { prompt, sent: false, previous: undefined };
    /** Settles when a WebSocket start was accepted (or refused). @type {Promise<void>} */
    this.started = new Promise((resolve, reject) => { this._settle = { resolve, reject }; });
    if (prompt === null) { this._settle.resolve(); }
    if (transport === "sse") { this._openEvents(after); }
    else if (after) { this._resumeSocket(); }
    else { this._openSocket(null); }
  }

  /** Stop the run on the server; its `done` ("stopped") follows. */
  async stop() {
    const socket = this._source;
    if (socket instanceof WebSocket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "stop" }));
    } else {
      await this.client.stop(this.key);
    }
  }

  /** Let go of the stream (the run goes on on the server); ends the iterator. */
  close() {
    if (this.closed) { return; }
    this.closed = true;
    clearTimeout(this._timer);
    const source = this._source;
    this._source = null;
    source?.close();
    this._wake();
  }

  /** @returns {AsyncIterator<RunEvent>} */
  [Symbol.asyncIterator]() {
    return {
      next: () => new Promise((resolve, reject) => {
        this._reader = { resolve, reject };
        this._wake();
      }),
      return: async () => { this.close(); return { value: undefined, done: true }; },
    };
  }

  _wake() {
    const reader = this._reader;
    if (!reader) { return; }
    if (this._buffer.length) {
      reader.resolve({ value: /** @type {RunEvent} */ (this._buffer.shift()), done: false });
    } else if (this.error) {
      reader.reject(this.error);
    } else if (this.closed) {
      reader.resolve({ value: undefined, done: true });
    } else {
      return;
    }
    this._reader = null;
  }

  /** @param {string | null} id @param {string} name @param {any} data */
  _receive(id, name, data) {
    if (this.closed) { return; }
    this._retries = 0;
    if (id) { this.lastEventId = id; }
    const event = { id, event: name, data };
    const on = this.callbacks;
    if (name === "start") { this.runId = data.run; }
    this._buffer.push(event);
    if (name === "done") {
      // Close before anything else, so that nothing reconnects after the end.
      this.status = data.status;
      this.close();
      on.onDone?.(data.status, data);
      return;
    }
    this._wake();
    if (name === "start") { on.onStart?.(data, event); }
    else if (name === "delta") { on.onDelta?.(data.text, event); }
    else { on.onEvent?.(name, data, event); }
  }

  /** The stream was refused or failed for good. @param {RunError} error */
  _fail(error) {
    if (this.closed) { return; }
    this.error = error;
    this.close();
    if (this._pending) { this._settle.reject(error); } else { this.callbacks.onError?.(error); }
  }

  // -- Server-Sent Events ---------------------------------------------------

  /** @param {string | null} after */
  _openEvents(after) {
    const query = after ? `?after=${encodeURIComponent(after)}` : "";
    const source = new EventSource(this.client.url(this.key, "events/") + query);
    this._source = source;
    for (const name of ["start", "delta", "done", ...this.client.events]) {
      source.addEventListener(name, (message) => {
        if (this._source !== source) { return; }
        this._receive(message.lastEventId || null, name, JSON.parse(message.data));
      });
    }
    source.onerror = () => {
      if (this._source !== source) { return; }
      // CONNECTING: a dropped connection that EventSource resumes itself with Last-Event-ID.
      if (source.readyState === EventSource.CONNECTING) {
        this.callbacks.onReconnecting?.();
        return;
      }
      // CLOSED: the server answered 204 or an error, and EventSource will not say which.
      source.close();
      this._source = null;
      this._explain();
    };
  }

  /**
   * A plain GET of the events URL after `lastEventId`, for its status only
   * (a stream's body is never read). Null if the run was closed meanwhile,
   * or when the server cannot be reached (the run has then failed).
   * @returns {Promise<Response | null>}
   */
  async _probe() {
    const query = this.lastEventId ? `?after=${encodeURIComponent(this.lastEventId)}` : "";
    const abort = new AbortController();
    let response;
    try {
      const url = this.client.url(this.key, "events/") + query;
      response = await fetch(url, { credentials: "same-origin", signal: abort.signal });
    } catch {
      this._fail(new RunError("The server cannot be reached.", 0));
      return null;
    }
    if (response.ok) { abort.abort(); }
    return this.closed ? null : response;
  }

  /**
   * The probe answered 204: we hold the terminal event's id but not the event
   * (it was on its way when the connection dropped, or the caller passed it as
   * `after`). The run's status says how it ended.
   */
  async _ended() {
    try {
      const { run } = await this.client.request(this.client.url(this.key));
      const data = run.error ? { status: run.status, error: run.error } : { status: run.status };
      this._receive(null, "done", data);
    } catch (error) {
      this._fail(/** @type {RunError} */ (error));
    }
  }

  /** Ask the events URL again with a plain request to learn why EventSource gave up. */
  async _explain() {
    const response = await this._probe();
    if (!response) { return; }
    if (response.status === 204) {
      await this._ended();
    } else if (response.ok && this._retries++ < 3) {
      this._timer = setTimeout(() => this._openEvents(this.lastEventId), 500 * this._retries);
    } else {
      const failing = new RunError("The stream keeps failing.", 0);
      this._fail(response.ok ? failing : await errorOf(response));
    }
  }

  // -- WebSocket ------------------------------------------------------------

  /**
   * Follow over a WebSocket after a given id. After a run's last event the
   * socket gets nothing and stays open for the session's next start, so the
   * follow would never end: ask the events URL first, which answers 204 then.
   */
  async _resumeSocket() {
    const response = await this._probe();
    if (!response) { return; }
    if (response.status === 204) {
      await this._ended();
    } else if (response.ok) {
      this._openSocket(this.lastEventId);
    } else {
      this._fail(await errorOf(response));
    }
  }

  /** @param {string | null} after */
  _openSocket(after) {
    let base = this.client.wsBase;
    if (!/^wss?:/.test(base)) {
      base = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${base}`;
    }
    // Resume by the URL (`?after=`), not by a "resume" frame sent after the
    // connect: the socket starts a replay from the run's start the moment it
    // opens, so a frame would come too late to keep the text from doubling.
    const query = after ? `?after=${encodeURIComponent(after)}` : "";
    const socket = new WebSocket(`${base}${encodeURIComponent(this.key)}/${query}`);
    this._source = socket;
    socket.onmessage = (message) => {
      if (this._source !== socket) { return; }
      const frame = JSON.parse(message.data);
      if (this._pending && !this._accepted(socket, frame)) { return; }
      if (frame.event === "error") {
        this.callbacks.onError?.(new RunError(frame.data.error, 400));
      } else {
        this._receive(frame.id, frame.event, frame.data);
      }
    };
    socket.onclose = (close) => {
      if (this._source !== socket) { return; }
      this._source = null;
      if (close.code === 4404 && this._pending && !this._pending.sent) {
        // A session is created by its first run, over HTTP: the socket is refused until then.
        this.client.request(this.client.url(this.key), { prompt: this._pending.prompt }).then(
          () => { this._pending = null; this._settle.resolve(); this._openSocket(null); },
          (error) => this._fail(error),
        );
      } else if (close.code >= 4000 && close.code < 5000) {
        const message = close.reason || REFUSALS[close.code] || `Refused (${close.code}).`;
        this._fail(new RunError(message, close.code - 4000));
      } else if (this._pending?.sent) {
        // Sending the prompt again could start it twice: let the caller decide.
        this._fail(new RunError("The connection closed before the run started.", 0));
      } else if (this._pending && this._retries >= 3) {
        this._fail(new RunError("The server cannot be reached.", 0));
      } else {
        // Nothing was sent yet, or we follow a run: connecting again is safe.
        if (!this._pending) { this.callbacks.onReconnecting?.(); }
        const delay = Math.min(5000, 250 * 2 ** this._retries++);
        this._timer = setTimeout(() => this._openSocket(this.lastEventId), delay);
      }
    };
  }

  /**
   * While a WebSocket start is pending: on connect the socket replays the
   * session's previous run, which begins with its `start`. Send our prompt
   * then, and pass nothing on until a `start` of another run: that one is ours.
   * @param {WebSocket} socket @param {{ id: string, event: string, data: any }} frame
   */
  _accepted(socket, frame) {
    const pending = /** @type {{ prompt: string, sent: boolean, previous?: string }} */ (
      this._pending
    );
    if (frame.event === "error") {
      this._fail(new RunError(frame.data.error, 400));
      return false;
    }
    if (!pending.sent) {
      pending.sent = true;
      pending.previous = frame.event === "start" ? frame.data.run : undefined;
      socket.send(JSON.stringify({ type: "start", prompt: pending.prompt }));
      return false;
    }
    if (frame.event !== "start" || frame.data.run === pending.previous) { return false; }
    this._pending = null;
    this._settle.resolve();
    return true;
  }
}
