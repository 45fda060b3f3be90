/**
 * A run's page in the admin, live: while the run is in flight, ask its live
 * view (RunAdmin.live_view, a JSON view for staff) about once a second and put
 * what it says on the page: its text, status, usage, times and the events in
 * its log. It stops once the run ended. No dependencies, no inline script: the
 * page's `<p class="detached-runs-live">` says where to ask and what to say.
 */
"use strict";

(() => {
  /** Milliseconds between two polls (counted from the end of the previous one). */
  const EVERY = 1000;

  /** The value of the row `name` on the page (its `div.readonly`), or null. */
  function row(name) {
    return document.querySelector(`.field-${name} div.readonly`);
  }

  /** Put `text` in `element`, keeping a scrolled box at its end if it was there. */
  function put(element, text) {
    if (element.textContent === text) return;
    const atEnd = element.scrollHeight - element.scrollTop - element.clientHeight < 4;
    element.textContent = text;
    if (atEnd) element.scrollTop = element.scrollHeight;
  }

  function show(run) {
    for (const [name, text] of Object.entries(run.fields)) {
      const element = row(name);
      if (element) put(element, text);
    }
    const events = document.querySelector('[data-live="events"]');
    // Markup the server rendered from its own template (escaped there).
    if (events && events.innerHTML !== run.events_html) events.innerHTML = run.events_html;
  }

  function follow(note) {
    const url = note.dataset.liveUrl;
    async function poll() {
      let run;
      try {
        const reply = await fetch(url, {
          headers: { Accept: "application/json" },
          credentials: "same-origin",
          cache: "no-store",
          redirect: "error", // a login page instead: the session ended
        });
        if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
        run = await reply.json();
      } catch {
        note.textContent = note.dataset.textFailed;
        setTimeout(poll, EVERY);
        return;
      }
      show(run);
      if (run.in_flight) {
        note.textContent = note.dataset.textFollowing;
        setTimeout(poll, EVERY);
      } else {
        note.textContent = note.dataset.textEnded;
        note.dataset.inFlight = "false";
      }
    }
    poll();
  }

  function start() {
    const note = document.querySelector(".detached-runs-live[data-live-url]");
    if (note && note.dataset.inFlight === "true") follow(note);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
