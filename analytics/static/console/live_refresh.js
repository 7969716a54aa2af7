/* Live queues in the ops console: the dashboard and the delivery, unassigned-order and ticket
 * lists follow /ws/ops/ (without locations: only state changes reach them).
 *
 * <script src=".../live_refresh.js" data-socket="/ws/ops/?locations=0" data-events="a b c"
 *         data-mode="swap" data-regions="id1 id2"></script>
 *
 * - swap (the dashboard): on an event of `data-events`, this page is fetched again and the
 *   elements named in `data-regions` that changed are replaced by their fresh copies, at most
 *   every 10 s (each swap reads the dashboard's aggregates);
 * - banner (a list): a bar at the top counts the changes since the page was loaded, with a
 *   Reload link, and says when live updates are paused (reconnecting) or stopped (signed out). The list itself is left alone: a reload under the pointer would lose the rows
 *   ticked for an action and the place being read.
 * Every reopen counts as a change in banner mode (what happened while the socket was down is
 * unknown); every open refreshes in swap mode. Reconnects with backoff; a signed-out socket (4401/4403)
 * stops; too many of this login's sockets (4429) tries again in a minute. */
(function () {
  "use strict";
  const script = document.currentScript;
  if (!script || !("WebSocket" in window)) return;
  const socketPath = script.dataset.socket;
  const wanted = new Set((script.dataset.events || "").split(/\s+/).filter(Boolean));
  const mode = script.dataset.mode === "swap" ? "swap" : "banner";
  const regions = (script.dataset.regions || "").split(/\s+/).filter(Boolean);
  const SWAP_GAP_MS = 10000;
  const STEADY_MS = 10000;
  const SETTLED_MS = 500;  // a refused socket is accepted, then closed at once (4401/4403/4429)
  const body = document.body;
  let changes = 0, opened = 0, lastSwap = 0, swapTimer = null, attempt = 0, requested = 0, applied = 0;

  function state(name) {
    body.dataset.liveState = name;
    if (mode === "banner") banner();
  }

  const STATE_TEXT = {
    offline: "Live updates are paused: reconnecting. ",
    "signed-out": "Live updates stopped: signed out. ",
  };

  function banner() {
    const stateText = STATE_TEXT[body.dataset.liveState] || "";
    let bar = document.getElementById("live-changes");
    if (!changes && !stateText) {  // nothing to say (yet, or again: back online with no change)
      if (bar) bar.remove();
      return;
    }
    if (!bar) {
      bar = document.createElement("p");
      bar.id = "live-changes";
      bar.className = "live-changes";
      bar.setAttribute("role", "status");
      const content = document.getElementById("content") || body;
      content.insertBefore(bar, content.firstChild);
    }
    bar.textContent = "";
    if (changes) bar.append(`${changes} change${changes === 1 ? "" : "s"} since this page was loaded. `);
    bar.append(stateText);
    const link = document.createElement("a");
    link.href = window.location.href;
    link.textContent = "Reload";
    bar.append(link);
    body.dataset.liveChanges = String(changes);
  }

  function swap() {
    swapTimer = null;
    lastSwap = Date.now();
    const seq = ++requested;
    fetch(window.location.href, { credentials: "same-origin", redirect: "error", headers: { "X-Requested-With": "console-live" } })
      .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
      .then((html) => {
        if (seq < applied) return;  // a later fetch landed first
        applied = seq;
        const fresh = new DOMParser().parseFromString(html, "text/html");
        for (const id of regions) {
          const here = document.getElementById(id), there = fresh.getElementById(id);
          // (only what changed: an element under the pointer stays the same element)
          if (here && there && here.outerHTML !== there.outerHTML) here.replaceWith(document.importNode(there, true));
        }
        body.dataset.liveRefreshed = String(Date.now());
      })
      .catch(() => { /* signed out (a redirect to the login), or down: the next event or reconnect tries again */ });
  }

  function changed() {
    if (mode === "banner") {
      changes += 1;
      banner();
    } else if (!swapTimer) {
      swapTimer = setTimeout(swap, Math.max(0, lastSwap + SWAP_GAP_MS - Date.now()));
    }
  }

  function connect() {
    state("connecting");
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}${socketPath}`);
    let settled = null, steady = null;
    socket.onopen = () => {
      // the backoff starts again once the socket has stayed open a while: a server closing it
      // at once (1012, 1013: overloaded) is not met every second
      steady = setTimeout(() => { attempt = 0; }, STEADY_MS);
      settled = setTimeout(() => {  // still open: not a refusal
        state("live");
        // swap: the page was rendered before the socket joined, so fetch it once now; banner:
        // back after a drop, what happened meanwhile is unknown
        if (mode === "swap" || opened) changed();
        opened += 1;
      }, SETTLED_MS);
    };
    socket.onmessage = (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch (err) { return; }
      if (wanted.has(event.type)) changed();
    };
    socket.onclose = (close) => {
      clearTimeout(settled);
      clearTimeout(steady);
      if (close.code === 4401 || close.code === 4403) { state("signed-out"); return; }
      state("offline");
      if (close.code === 4429) { setTimeout(connect, 60000 * (0.75 + Math.random() * 0.5)); return; }
      attempt += 1;
      setTimeout(connect, Math.min(30000, 1000 * 2 ** Math.min(attempt - 1, 5)) * (0.75 + Math.random() * 0.5));
    };
  }

  connect();
})();
