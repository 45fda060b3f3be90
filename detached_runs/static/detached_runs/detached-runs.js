/**
 * The browser side of django detached_runs, without dependencies: start a run,
 * follow it over Server-Sent Events or a WebSocket (replay, then live), stop it;
 * list the conversations, read one, delete one.
 *
 *   const client = new DetachedRuns({ base: "/runs/" });
 *   const run = await client.start("chat-1", "Hello", { onDelta: (text) => out.append(text) });
 *   for await (const event of run) console.log(event.event, event.data);
 *   const { sessions, next } = await client.sessions({ limit: 20 });
 *
 * A dropped connection, and an answer that may change if asked again (a proxy's
 * 502, 503 or 504 while the server restarts, a 429 with a Retry-After), are
 * retried with a bounded exponential back-off, resuming after the last event
 * id seen, over both transports; only answers that cannot change (400, 403,
 * 404...) end a stream at once. `transient()` is the one place that tells
 * them apart, `Backoff` the one schedule.
 */

/** One event of a run's log. @typedef {{ id: string | null, event: string, data: any }} RunEvent */

/**
 * A retry about to be made: the how-manieth of this outage, the wait before it
 * (ms), and the failure that caused it.
 * @typedef {{ attempt: number, delay: number, error: RunError }} Retrying
 */

/**
 * One conversation of `sessions()`.
 * @typedef {object} SessionSummary
 * @property {string} session its key
 * @property {string} title its first prompt, cut to 80 characters at a word
 * @property {string} status its latest run's status ("running", "waiting", "done", ...)
 * @property {number} runs how many runs it has
 * @property {string} started_at when its first run started (ISO 8601)
 * @property {string} updated_at when its latest run started (ISO 8601): the list's order
 */

/**
 * A page of `sessions()`, most recently active first; `next` is the cursor of the
 * page after it, null on the last one.
 * @typedef {{ sessions: SessionSummary[], next: string | null }} SessionsPage
 */

/**
 * One run, as `GET <key>/` and `runs()` show it (times in ISO 8601, or null).
 * @typedef {object} RunInfo
 * @property {string} id @property {string} status @property {string} prompt
 * @property {string} output the answer: so far, for the run in flight
 * @property {string} error a safe message, for status "error"
 * @property {object} options @property {object} usage
 * @property {string} started_at @property {string | null} first_token_at
 * @property {string | null} finished_at
 */

/**
 * A page of `runs()`: runs oldest first; `next` is the cursor of the page of older
 * runs, null on the page with the session's first run.
 * @typedef {{ session: string, runs: RunInfo[], next: string | null }} RunsPage
 */

/**
 * A question of the agent (an `input_required` event's data): its id, and what the
 * agent asks (the rest is the agent's: `{ question, choices }`, say).
 * @typedef {{ request: string, [key: string]: any }} InputRequest
 */

/**
 * Which page of a list: at most `limit` items (1 to 100; the server's default
 * without it: 20 sessions, 50 runs), after `cursor` (the previous page's `next`).
 * @typedef {{ limit?: number, cursor?: string | null }} PageOptions
 */

/**
 * What a run reports. Every callback is optional.
 * @typedef {object} Callbacks
 * @property {(data: { run: string, prompt: string }, event: RunEvent) => void} [onStart]
 *   first event of a run; a replay (after a reload, say) begins with it too
 * @property {(text: string, event: RunEvent) => void} [onDelta] a piece of the answer
 * @property {(name: string, data: any, event: RunEvent) => void} [onEvent] the agent's own events
 * @property {(request: InputRequest, event: RunEvent) => void} [onInputRequired] the agent asks
 *   the user something (`ctx.ask`): the run waits for `run.answer(request.request, value)`.
 *   A replay has it too: after a reload, in another tab, it comes again while it is pending
 * @property {(data: { request: string }, how: "received" | "timeout" | "ended",
 *   event: RunEvent | null) => void} [onInputDone] the pending question is no longer pending:
 *   answered (here or in another tab), timed out, or its run ended (`event` is then null)
 * @property {(status: string, data: { status: string, error?: string }) => void} [onDone]
 *   the terminal event: "done", "error", "stopped" or "interrupted"; the stream is closed
 * @property {(error: RunError) => void} [onError] a refusal (404, 403, 429...), or transient
 *   failures that outlasted the retries: the stream is closed; or, over a WebSocket, a frame
 *   the server rejected (the stream goes on)
 * @property {(retrying: Retrying) => void} [onReconnecting] the connection dropped or the
 *   server answered with a transient failure; it is tried again after `retrying.delay` ms
 *   (called before each retry, also of a `start`)
 */

/**
 * How transient failures are retried: the n-th retry of an outage waits a random 50-100 %
 * of `min(max, base * 2 ** (n - 1))` ms, or longer if the answer's Retry-After asks it.
 * The module gives up (onError, or the `start` or `stop` promise rejects) once `attempts`
 * retries in a row failed, or when the next retry would begin more than `maxElapsed` ms
 * after the outage's first failure (a Retry-After beyond that too). An event received
 * ends the outage.
 * @typedef {object} RetryOptions
 * @property {number} [base] ms, default 250
 * @property {number} [max] ms, default 5000
 * @property {number} [attempts] default Infinity: only `maxElapsed` bounds the retries
 * @property {number} [maxElapsed] ms, default 60000
 */

/**
 * @typedef {object} Options
 * @property {string} [base] where `detached_runs.urls` is mounted (default "/runs/")
 * @property {string} [wsBase] the WebSocket routes: a path or a ws(s):// URL (default "/ws/runs/")
 * @property {"sse" | "ws"} [transport] default "sse"
 * @property {string[]} [events] the agent's own event types. EventSource delivers only the
 *   types it listens for, so name them here to get them over SSE (a WebSocket gets all).
 * @property {string} [csrfToken] default: the `csrftoken` cookie, read at each request
 * @property {RetryOptions} [retry] the back-off of transient failures
 */

/**
 * Whether a run's status is that of a run in flight: "running", or "waiting" (its agent
 * asked the user something and waits for the answer). "queued" is not yet in flight;
 * "done", "error", "stopped" and "interrupted" are ended.
 * @param {string} status @returns {boolean}
 */
export function inFlight(status) {
  return status === "running" || status === "waiting";
}

/** The events of a question (`ctx.ask`): every Run listens for them. */
const INPUT_EVENTS = ["input_required", "input_received", "input_timeout"];

/** @type {Required<RetryOptions>} */
export const RETRY = Object.freeze({
  base: 250, max: 5000, attempts: Infinity, maxElapsed: 60_000,
});

/**
 * Whether an answer may change if the same request is made again. The one place
 * that tells a passing failure from a final one, for every request and both transports:
 *
 * - 503, and 429 with a Retry-After: refused before anything was done (a proxy with
 *   no server behind it, the database or Redis away, a rate limit that says when).
 * - 502, 504 and no answer at all (status 0: a network error, a connection dropped
 *   or refused, a WebSocket closed without a 4xxx code, a failed handshake):
 *   transient too, but the request may have reached the server and been done, so
 *   not for a request that must not be done twice (a start, `idempotent` false).
 * - Anything else is final: 400, 403, 404, 405, 429 without Retry-After, 500.
 *
 * @param {number} status an HTTP status; 0 for no answer; a WebSocket's 4xxx close code - 4000
 * @param {number | null} [retryAfter] the answer's Retry-After in ms, if it had one
 * @param {boolean} [idempotent] false when doing the request twice would do its work twice
 */
export function transient(status, retryAfter = null, idempotent = true) {
  if (status === 503 || (status === 429 && retryAfter !== null)) { return true; }
  return idempotent && (status === 0 || status === 502 || status === 504);
}

/**
 * An error the server reported (`{"error": ...}`, a 4xxx close code), or a connection that failed.
 * `status`: the HTTP status (a close code minus 4000); 0 when there was no answer.
 * `transient`: asking again may get another answer (see `transient()`); it is false
 * for a start that may have started a run, which only the caller can decide to send again.
 * `retryAfter`: the answer's Retry-After in ms, or null.
 */
export class RunError extends Error {
  /**
   * @param {string} message safe to show a user @param {number} status
   * @param {{ retryAfter?: number | null, idempotent?: boolean }} [details]
   */
  constructor(message, status, { retryAfter = null, idempotent = true } = {}) {
    super(message);
    this.name = "RunError";
    this.status = status;
    this.retryAfter = retryAfter;
    this.transient = transient(status, retryAfter, idempotent);
  }
}

/**
 * The one back-off schedule (see `RetryOptions`), kept per run or request: call
 * `next()` after each failure, `reset()` once something got through.
 */
export class Backoff {
  /** @param {Required<RetryOptions>} options */
  constructor(options) {
    this.options = options;
    /** Retries made in this outage. */
    this.attempt = 0;
    /** When this outage's first failure came (ms). */
    this.since = 0;
  }

  reset() { this.attempt = 0; }

  /**
   * The wait in ms before retrying after `error`, or null to give up: the error is
   * final, or this outage has used up its retries.
   * @param {RunError} error
   */
  next(error) {
    if (!error.transient) { return null; }
    const { base, max, attempts, maxElapsed } = this.options;
    const now = Date.now();
    if (this.attempt === 0) { this.since = now; }
    const step = Math.min(max, base * 2 ** this.attempt);
    let delay = step / 2 + (Math.random() * step) / 2;  // jitter: clients do not come back at once
    if (error.retryAfter !== null) {
      delay = Math.max(delay, error.retryAfter + Math.random() * base);
    }
    if (this.attempt >= attempts || now + delay - this.since > maxElapsed) { return null; }
    this.attempt += 1;
    return delay;
  }
}

/** Messages for the server's close codes, for servers that drop the close reason. */
const REFUSALS = { 4400: "Bad request.", 4403: "Log in first.", 4404: "No such session.",
  4429: "Too many at once; try again later.", 4503: "Unavailable; try again shortly." };

/** A run's statuses once it has ended: those of its `done` event. */
const ENDED = new Set(["done", "error", "stopped", "interrupted"]);

/** @param {string} name */
function cookie(name) {
  const pair = document.cookie.split("; ").find((c) => c.startsWith(`${name}=`));
  return pair ? decodeURIComponent(pair.slice(name.length + 1)) : "";
}

/** A Retry-After header (seconds or an HTTP date) in ms, or null. @param {string | null} value */
function retryAfterOf(value) {
  if (!value) { return null; }
  const ms = /^\s*\d+\s*$/.test(value) ? Number(value) * 1000 : Date.parse(value) - Date.now();
  return Number.isNaN(ms) ? null : Math.max(0, ms);
}

/** @param {Response} response @param {boolean} [idempotent] @returns {Promise<RunError>} */
async function errorOf(response, idempotent = true) {
  let message = "";
  try { message = (await response.json()).error || ""; } catch { /* not JSON */ }
  return new RunError(message || `The server answered ${response.status}.`, response.status, {
    retryAfter: retryAfterOf(response.headers.get("Retry-After")), idempotent,
  });
}

/**
 * A WebSocket's close as an answer: a 4xxx code is the server's refusal (its HTTP
 * status + 4000); any other close is no answer (status 0): 1006 (a dropped
 * connection, a failed handshake), 1001, 1011, 1012, 1013...
 * @param {CloseEvent} close @param {boolean} idempotent
 */
function closeError(close, idempotent) {
  if (close.code >= 4000 && close.code < 5000) {
    const message = close.reason || REFUSALS[close.code] || `Refused (${close.code}).`;
    return new RunError(message, close.code - 4000, { idempotent });
  }
  return new RunError("The connection to the server was lost.", 0, { idempotent });
}

/**
 * A WebSocket error frame as a `RunError`: `data.status` is the HTTP status the
 * same request would have got (400 from a server that does not send it).
 * @param {{ data: { error: string, status?: number } }} frame
 */
function frameError(frame) {
  return new RunError(frame.data.error, frame.data.status ?? 400);
}

/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

/** The query string of a page of a list ("" for the defaults). @param {PageOptions} page */
function pageQuery({ limit, cursor } = {}) {
  const query = new URLSearchParams();
  if (limit !== undefined && limit !== null) { query.set("limit", String(limit)); }
  if (cursor) { query.set("cursor", cursor); }
  const text = query.toString();
  return text ? `?${text}` : "";
}

export class DetachedRuns {
  /** @param {Options} [options] */
  constructor(options = {}) {
    this.base = options.base ?? "/runs/";
    this.wsBase = options.wsBase ?? "/ws/runs/";
    this.transport = options.transport ?? "sse";
    this.events = options.events ?? [];
    this.csrfToken = options.csrfToken;
    /** @type {Required<RetryOptions>} */
    this.retry = { ...RETRY, ...options.retry };
  }

  /** The URL of a session's endpoint. @param {string} key @param {string} [suffix] */
  url(key, suffix = "") {
    return `${this.base}${encodeURIComponent(key)}/${suffix}`;
  }

  /**
   * Start a run of session `key` and follow it. `options.options` (a JSON
   * object) reaches the agent as `ctx.options`; `options.multitask` says what
   * happens to a run in flight: "interrupt" (the server's default setting
   * decides if absent), "reject" (a 409 `RunError`), "enqueue" (the run waits
   * for the runs before it: the returned `Run` reports nothing until its own
   * `start`, then follows it; if the queue is cancelled first, it ends with
   * `done`, "stopped", alone) or "rollback".
   * Rejects with a `RunError` when the server refuses (bad prompt, 403, 429...).
   * A 503 (or a 429 with a Retry-After) is retried: nothing was started. No
   * answer, a 502 or a 504 is not: the run may have started, and sending the
   * prompt again could start it twice; the caller decides (look at the session).
   * @param {string} key @param {string} prompt @param {Callbacks} [callbacks]
   * @param {{ transport?: "sse" | "ws", options?: object,
   *   multitask?: "interrupt" | "reject" | "enqueue" | "rollback" }} [options]
   * @returns {Promise<Run>}
   */
  async start(key, prompt, callbacks = {}, options = {}) {
    const transport = options.transport ?? this.transport;
    const extra = {
      ...(options.options === undefined ? {} : { options: options.options }),
      ...(options.multitask === undefined ? {} : { multitask: options.multitask }),
    };
    if (transport === "ws" && options.multitask !== "enqueue") {
      const run = new Run(this, key, "ws", callbacks, null, prompt, extra);
      await run.started;
      return run;
    }
    // A queued run is started over HTTP, then followed (over either transport)
    // past the runs before it.
    const body = { prompt, ...extra };
    const answer = await this._persist(this.url(key), body, false, callbacks.onReconnecting);
    const run = new Run(this, key, transport, callbacks, null, null, {}, answer.id);
    return run;
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

  /**
   * Stop the session's run in flight: true if one was stopped; with `all`, cancel
   * its queued runs first. Retried while the answer is transient: stopping twice
   * does no more than once.
   * @param {string} key @param {{ all?: boolean }} [options]
   */
  async stop(key, { all = false } = {}) {
    return (await this._persist(this.url(key, "stop/"), all ? { all: true } : {})).stopped;
  }

  /**
   * Answer the question `request` (an `input_required` event's `request`) that the
   * session's run waits for with `value` (any JSON value): resolves `true` once the
   * server took it (its `input_received` event follows). Rejects with a `RunError`:
   * 409 if the run no longer waits for it (answered in another tab, timed out, ended),
   * 404 for a session that is not yours, 400 for a value over `MAX_INPUT_BYTES`. A 503 is
   * retried (nothing was taken); no answer at all is not (it may have been taken).
   * @param {string} key @param {string} request @param {any} value
   * @returns {Promise<boolean>}
   */
  async answer(key, request, value) {
    const body = { request, value };
    return (await this._persist(this.url(key, "input/"), body, false)).accepted;
  }

  /**
   * The requester's conversations, most recently active first, a page at a time:
   * pass the `next` it resolves to as `cursor` for the following page. Retried while
   * the answer is transient; rejects with a `RunError` otherwise (400 for a bad
   * `limit` or `cursor`, 403 when not logged in and anonymous use is off).
   * @param {PageOptions} [page]
   * @returns {Promise<SessionsPage>}
   */
  async sessions(page = {}) {
    return this._persist(this.base + pageQuery(page));
  }

  /**
   * The runs of session `key`, from the newest backwards: the first page holds the
   * latest runs, `next` leads to older ones; each page is oldest first. The run in
   * flight shows its answer so far (follow it for the rest). Rejects with a
   * `RunError` 404 for a session that has no run or is not the requester's.
   * @param {string} key @param {PageOptions} [page]
   * @returns {Promise<RunsPage>}
   */
  async runs(key, page = {}) {
    return this._persist(this.url(key, "runs/") + pageQuery(page));
  }

  /**
   * Delete session `key`: its run in flight is stopped (its followers get `done`,
   * "stopped"), then every run of it goes, saved answers and logs. Resolves once it
   * is gone; rejects with a `RunError` 404 for a session that has no run or is not
   * the requester's. Retried while the answer is transient: a retry that finds the
   * session gone (the first attempt did it, but its answer was lost) resolves too.
   * @param {string} key
   * @returns {Promise<void>}
   */
  async delete(key) {
    let retried = false;
    try {
      await this._persist(this.url(key), undefined, true, () => { retried = true; }, "DELETE");
    } catch (error) {
      if (!(retried && error instanceof RunError && error.status === 404)) { throw error; }
    }
  }

  /**
   * GET `url`, or POST `body` to it as JSON (or send `method`), once; throws a
   * `RunError` unless the answer is 2xx. Resolves to the JSON answer (null for 204).
   * @param {string} url @param {object} [body] @param {boolean} [idempotent] false for a start
   * @param {string} [method] default: GET without a body, POST with one
   */
  async request(url, body, idempotent = true, method = body === undefined ? "GET" : "POST") {
    const csrf = this.csrfToken ?? cookie("csrftoken");
    /** @type {RequestInit} */
    const init = { credentials: "same-origin", method };
    if (method !== "GET") { init.headers = { "X-CSRFToken": csrf }; }
    if (body !== undefined) {
      init.headers = { "Content-Type": "application/json", "X-CSRFToken": csrf };
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch {
      throw new RunError("The server cannot be reached.", 0, { idempotent });
    }
    if (!response.ok) { throw await errorOf(response, idempotent); }
    return response.status === 204 ? null : response.json();
  }

  /**
   * `request`, made again after each transient failure on the back-off schedule.
   * @param {string} url @param {object} [body] @param {boolean} [idempotent]
   * @param {(retrying: Retrying) => void} [onRetry] @param {string} [method]
   */
  async _persist(url, body, idempotent = true, onRetry = undefined, method = undefined) {
    const backoff = new Backoff(this.retry);
    for (;;) {
      try {
        return await this.request(url, body, idempotent, method);
      } catch (error) {
        const delay = backoff.next(/** @type {RunError} */ (error));
        if (delay === null) { throw error; }
        onRetry?.({ attempt: backoff.attempt, delay, error: /** @type {RunError} */ (error) });
        await sleep(delay);
      }
    }
  }
}

/**
 * One followed run: callbacks and an async iterator of its events. It ends
 * after `done` (or a refusal, or transient failures that outlasted the
 * retries). `close()` only lets go: the run goes on on the server. Events are
 * kept for the iterator until it reads them.
 */
export class Run {
  /**
   * @param {DetachedRuns} client @param {string} key @param {"sse" | "ws"} transport
   * @param {Callbacks} callbacks @param {string | null} after @param {string | null} prompt
   * @param {object} [extra] `options` and `multitask` of a WebSocket start
   * @param {string | null} [expect] the id of a run started over HTTP: events of the
   *   session's runs before it (a queue) are skipped
   */
  constructor(client, key, transport, callbacks, after, prompt, extra = {}, expect = null) {
    this.client = client;
    this.key = key;
    this.transport = transport;
    this.callbacks = callbacks;
    /**
     * @type {string | null} the run's id: from the 202 of a start made over HTTP
     * (a queued run's too), else from the last `start` event
     */
    this.runId = expect;
    /** @type {string | null} */
    this.lastEventId = after;
    /** @type {string | null} the terminal status, once there */
    this.status = null;
    /** @type {InputRequest | null} the question the run waits for, while it is pending */
    this.inputRequest = null;
    /** @type {RunError | null} why the stream ended without `done` */
    this.error = null;
    this.closed = false;
    /** @type {string | null} a queued run's id, until its `start` arrives */
    this._expect = expect;
    /** @type {boolean} inside a run before the expected one */
    this._skipping = false;
    /** @type {object} */
    this._extra = extra;
    /** @type {RunEvent[]} */
    this._buffer = [];
    /** The iterator's pending `next()`. @type {{ resolve: Function, reject: Function } | null} */
    this._reader = null;
    /** @type {EventSource | WebSocket | null} */
    this._source = null;
    this._timer = 0;
    this._backoff = new Backoff(client.retry);
    // A WebSocket start: the prompt goes out as a "start" frame once the socket is open.
    this._pending = prompt === null ? null : { prompt, sent: false, previous: undefined };
    /** Settles when a WebSocket start was accepted (or refused). @type {Promise<void>} */
    this.started = new Promise((resolve, reject) => { this._settle = { resolve, reject }; });
    if (prompt === null) { this._settle.resolve(); }
    if (transport === "sse") { this._openEvents(after); }
    else if (prompt === null) { this._resumeSocket(); }
    else { this._openSocket(null); }
  }

  /**
   * Stop the session's run in flight on the server, as `client.stop(key)` does
   * (over HTTP whatever the transport: a WebSocket's stop frame gets no answer),
   * and resolve to the same: true if a run was stopped. Its `done` ("stopped")
   * follows on the stream.
   * @returns {Promise<boolean>}
   */
  async stop() {
    return this.client.stop(this.key);
  }

  /**
   * Answer the question the run waits for (`client.answer` for this run's session).
   * @param {string} request @param {any} value @returns {Promise<boolean>}
   */
  async answer(request, value) {
    return this.client.answer(this.key, request, value);
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
    this._backoff.reset();  // the server answers: the outage, if any, is over
    if (id) { this.lastEventId = id; }
    if (this._expect !== null) {
      // A queued run: the session's runs before it stream first. Skip them; at
      // each one's end, follow the session again (the server gives the next run).
      if (name === "start") {
        this._skipping = data.run !== this._expect;
        // Another run started: one before ours, or one that replaced the queue.
        if (this._skipping) { this._checkQueued(); }
      }
      if (this._skipping) {
        if (name === "done") { this._next(); }
        return;
      }
      this._expect = null;
    }
    const event = { id, event: name, data };
    const on = this.callbacks;
    if (name === "start") { this.runId = data.run; }
    this._buffer.push(event);
    if (name === "done") {
      // Close before anything else, so that nothing reconnects after the end.
      this.status = data.status;
      this.close();
      const pending = this.inputRequest;
      this.inputRequest = null;
      if (pending) { on.onInputDone?.({ request: pending.request }, "ended", null); }
      on.onDone?.(data.status, data);
      return;
    }
    this._wake();
    if (name === "start") { on.onStart?.(data, event); }
    else if (name === "delta") { on.onDelta?.(data.text, event); }
    else if (name === "input_required") {
      this.inputRequest = data;
      on.onInputRequired?.(data, event);
    } else if (name === "input_received" || name === "input_timeout") {
      if (this.inputRequest?.request === data.request) { this.inputRequest = null; }
      on.onInputDone?.(data, name === "input_received" ? "received" : "timeout", event);
    } else { on.onEvent?.(name, data, event); }
  }

  /** The stream was refused or failed for good. @param {RunError} error */
  _fail(error) {
    if (this.closed) { return; }
    this.error = error;
    this.close();
    if (this._pending) { this._settle.reject(error); } else { this.callbacks.onError?.(error); }
  }

  /**
   * After a failed attempt: `again` after the back-off's wait if `error` is
   * transient and retries are left, else fail for good.
   * @param {RunError} error @param {() => void} again
   */
  _retry(error, again) {
    if (this.closed) { return; }
    const delay = this._backoff.next(error);
    if (delay === null) {
      this._fail(error);
      return;
    }
    this.callbacks.onReconnecting?.({ attempt: this._backoff.attempt, delay, error });
    this._timer = setTimeout(() => { if (!this.closed) { again(); } }, delay);
  }

  /**
   * A connection that stayed up for a while (`retry.max` ms) before it dropped
   * counts as a recovery, even without an event (an agent may think for long):
   * a drop after it starts a new outage. @param {number} opened when it opened, or 0
   */
  _dropped(opened) {
    if (opened && Date.now() - opened >= this.client.retry.max) { this._backoff.reset(); }
  }

  // -- Server-Sent Events ---------------------------------------------------

  /**
   * Open an EventSource after `after`. Its own reconnect is not used: on any
   * error this module closes it and opens another on its back-off schedule,
   * with `?after=` the last id seen (the same resume as Last-Event-ID).
   * @param {string | null} after
   */
  _openEvents(after) {
    const query = after ? `?after=${encodeURIComponent(after)}` : "";
    const source = new EventSource(this.client.url(this.key, "events/") + query);
    this._source = source;
    let opened = 0;
    source.onopen = () => { opened = Date.now(); };
    for (const name of new Set([...INPUT_EVENTS, "start", "delta", "done", ...this.client.events])) {
      source.addEventListener(name, (message) => {
        if (this._source !== source) { return; }
        this._receive(message.lastEventId || null, name, JSON.parse(message.data));
      });
    }
    source.onerror = () => {
      if (this._source !== source) { return; }
      const dropped = source.readyState === EventSource.CONNECTING;
      source.close();
      this._source = null;
      if (dropped) {
        // A network error, or the stream cut: no answer, which is transient.
        this._dropped(opened);
        const lost = new RunError("The connection to the server was lost.", 0);
        this._retry(lost, () => this._reopen());
      } else {
        // CLOSED: the server answered 204 or an error, and EventSource will not say which.
        this._explain();
      }
    };
  }

  _reopen() { this._openEvents(this.lastEventId); }

  /**
   * A run before the expected one ended: follow the session again after its
   * last event. The server gives the next run (it waits a moment for a queued
   * one to start), or answers 204 when nothing follows, which `_ended`
   * explains. A WebSocket would follow the queue by itself, but says nothing
   * when the expected run was cancelled meanwhile: it is reopened the same way.
   */
  _next() {
    const source = this._source;
    if (source === null) { return; }
    this._source = null;  // first: its close is not a drop
    source.close();
    this._followAgain();
  }

  /** Follow the session again after `lastEventId`, over this run's transport. */
  _followAgain() {
    if (this.transport === "sse") { this._reopen(); } else { this._resumeSocket(); }
  }

  /**
   * The row of run `id` in the session's latest runs, or null if it is not
   * there (deleted: a `rollback` deletes the queue).
   * @param {string} id @returns {Promise<RunInfo | null>}
   */
  async _queuedRow(id) {
    const url = this.client.url(this.key, "runs/") + pageQuery({ limit: 100 });
    const page = /** @type {RunsPage} */ (await this.client.request(url));
    return page.runs.find((run) => run.id === id) ?? null;
  }

  /**
   * While waiting for a queued run, another run started. If ours was
   * cancelled before it started (a stop with `all`, an `interrupt` or
   * `rollback` start), its events never come: end now. Its row first, then
   * the session's current run: a run that ended after being current has
   * its events to replay. A failure here changes nothing (`_ended` asks again
   * when the stream has nothing more).
   */
  async _checkQueued() {
    const expect = this._expect;
    let row;
    try {
      row = await this._queuedRow(/** @type {string} */ (expect));
      if (row !== null && !ENDED.has(row.status)) { return; }
      const { run } = await this.client.request(this.client.url(this.key));
      if (run.id === expect) { return; }
    } catch {
      return;
    }
    if (this._expect === expect) { this._endQueued(row); }
  }

  /**
   * End a `Run` whose queued run will never stream: with its row's status
   * ("stopped" when cancelled), or "stopped" if the row is gone.
   * @param {RunInfo | null} row
   */
  _endQueued(row) {
    this._expect = null;
    const status = row?.status ?? "stopped";
    this._receive(null, "done", row?.error ? { status, error: row.error } : { status });
  }

  /**
   * A plain GET of the events URL after `lastEventId`, for its status only
   * (a stream's body is never read): the answer, a `RunError` (status 0) when
   * there was none, or null if the run was closed meanwhile.
   * @returns {Promise<Response | RunError | null>}
   */
  async _probe() {
    const query = this.lastEventId ? `?after=${encodeURIComponent(this.lastEventId)}` : "";
    const abort = new AbortController();
    let response;
    try {
      const url = this.client.url(this.key, "events/") + query;
      response = await fetch(url, { credentials: "same-origin", signal: abort.signal });
    } catch {
      return this.closed ? null : new RunError("The server cannot be reached.", 0);
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
    let run;
    /** @type {RunInfo | null | undefined} */
    let row;
    try {
      ({ run } = await this.client.request(this.client.url(this.key)));
      // Waiting for a queued run, and the session's current run is another:
      // was ours cancelled, or is it still to start?
      if (this._expect !== null && run.id !== this._expect) {
        row = await this._queuedRow(this._expect);
      }
    } catch (error) {
      this._retry(/** @type {RunError} */ (error), () => this._ended());
      return;
    }
    if (this.closed) { return; }
    if (row === undefined) {
      this._expect = null;  // ours (or the one followed) ended
      const data = run.error ? { status: run.status, error: run.error } : { status: run.status };
      this._receive(null, "done", data);
    } else if (row === null || ENDED.has(row.status)) {
      this._endQueued(row);
    } else {
      // Still queued, and nothing started it within the server's wait: ask again.
      const waiting = new RunError("The queued run has not started yet.", 0);
      this._retry(waiting, () => this._followAgain());
    }
  }

  /** Ask the events URL again with a plain request to learn why EventSource gave up. */
  async _explain() {
    const answer = await this._probe();
    if (answer === null) { return; }
    if (answer instanceof RunError) {
      this._retry(answer, () => this._reopen());
    } else if (answer.status === 204) {
      await this._ended();
    } else if (answer.ok) {
      // It answers now: what EventSource got was a passing failure.
      this._retry(new RunError("The stream keeps failing.", 0), () => this._reopen());
    } else {
      this._retry(await errorOf(answer), () => this._reopen());
    }
  }

  // -- WebSocket ------------------------------------------------------------

  /**
   * Follow over a WebSocket, from the start or after `lastEventId`. Ask the
   * events URL first: after a run's last event a socket gets nothing, and to a
   * session nobody started yet it stays open and idle for a start frame, so the
   * follow would never end; the events URL answers 204 and 404 then.
   */
  async _resumeSocket() {
    const answer = await this._probe();
    if (answer === null) { return; }
    if (answer instanceof RunError) {
      this._retry(answer, () => this._resumeSocket());
    } else if (answer.status === 204) {
      await this._ended();
    } else if (answer.ok) {
      this._openSocket(this.lastEventId);
    } else {
      this._retry(await errorOf(answer), () => this._resumeSocket());
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
    let opened = 0;
    socket.onopen = () => {
      opened = Date.now();
      // A start: is there a run? A socket to a session nobody started yet stays
      // idle, and answers this with an error frame; otherwise the replay comes.
      if (this._pending) { socket.send(JSON.stringify({ type: "resume", after: null })); }
    };
    socket.onmessage = (message) => {
      if (this._source !== socket) { return; }
      const frame = JSON.parse(message.data);
      if (this._pending && !this._accepted(socket, frame)) { return; }
      if (frame.event === "error") {
        this.callbacks.onError?.(frameError(frame));
      } else {
        this._receive(frame.id, frame.event, frame.data);
      }
    };
    socket.onclose = (close) => {
      if (this._source !== socket) { return; }
      this._source = null;
      const pending = this._pending;
      let error = closeError(close, !pending?.sent);
      if (pending?.sent) {
        if (error.transient) {
          pending.sent = false;  // refused before it was read (503): send it again
        } else if (error.status === 0) {
          // Sending the prompt again could start it twice: let the caller decide.
          const message = "The connection closed before the run started.";
          error = new RunError(message, 0, { idempotent: false });
        }
      }
      this._dropped(opened);
      this._retry(error, () => this._openSocket(this.lastEventId));
    };
  }

  /**
   * While a WebSocket start is pending: on connect the socket replays the
   * session's previous run, which begins with its `start`. Send our prompt
   * then, and pass nothing on until a `start` of another run: that one is ours.
   * To a session nobody started yet the socket says so (an error frame, the
   * answer to our `resume`): a new session is created by an HTTP POST (which
   * also gives the browser the session cookie that owns it), then followed.
   * @param {WebSocket} socket @param {{ id: string, event: string, data: any }} frame
   */
  _accepted(socket, frame) {
    const pending = /** @type {{ prompt: string, sent: boolean, previous?: string }} */ (
      this._pending
    );
    if (frame.event === "error" && !pending.sent) {
      this._source = null;
      socket.close();
      this._startOverHttp(pending.prompt);
      return false;
    }
    if (frame.event === "error") {
      this._fail(frameError(frame));
      return false;
    }
    if (!pending.sent) {
      pending.sent = true;
      pending.previous = frame.event === "start" ? frame.data.run : undefined;
      socket.send(JSON.stringify({ type: "start", prompt: pending.prompt, ...this._extra }));
      return false;
    }
    if (frame.event !== "start" || frame.data.run === pending.previous) { return false; }
    this._pending = null;
    this._settle.resolve();
    return true;
  }

  /** @param {string} prompt */
  async _startOverHttp(prompt) {
    const url = this.client.url(this.key);
    let answer;
    try {
      answer = await this.client._persist(url, { prompt }, false, this.callbacks.onReconnecting);
    } catch (error) {
      this._fail(/** @type {RunError} */ (error));
      return;
    }
    if (this.closed) { return; }
    this.runId = answer.id;
    this._pending = null;
    this._settle.resolve();
    this._openSocket(null);
  }
}
