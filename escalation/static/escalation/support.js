// Live refresh for the support views: listen on the support socket and, when an escalation
// or ticket event arrives, re-fetch this page and swap in its live regions
// ([data-live-region] elements, matched by id). Forms are outside the regions, so nothing an
// agent is typing is lost. Reconnects with backoff; the status pill shows the state.
// Every (re)open re-fetches too: whatever happened while the socket was down, or between the
// page being rendered and the socket joining its groups, is on the page once it says "live".
// Regions are rendered by the server per ticket, so a refresh never shows a ticket twice; a
// response older than one already applied is dropped.
(function () {
  "use strict";
  var body = document.body;
  var path = body.getAttribute("data-live-socket");
  if (!path || !("WebSocket" in window)) return;
  var match = (body.getAttribute("data-live-match") || "").split(/\s+/).filter(Boolean);
  var TYPES = ["support_ticket_created", "support_ticket_updated", "unassigned_order_escalated"];
  var pill = document.getElementById("live-status");
  var retry = 1000;
  var timer = null;
  var requested = 0;  // sequence of refreshes asked for
  // A ticket page also re-reads its regions every data-live-poll ms while the socket is open (and
  // the tab is shown): the socket carries ticket and escalation events, not its delivery's
  // offers, rejects and expiries (SUPPORT_TICKET_REFRESH_SECONDS).
  var pollMs = parseInt(body.getAttribute("data-live-poll") || "0", 10) || 0;
  var poller = null;
  var applied = 0;    // the newest one swapped in

  function state(name, text) {
    body.setAttribute("data-live-state", name);
    if (pill) {
      pill.textContent = text;
      pill.className = "live live-" + name;
    }
  }

  function concerns(event) {
    if (TYPES.indexOf(event.type) < 0) return false;
    if (!match.length) return true;
    return match.indexOf(event.ticketId) >= 0 || match.indexOf(event.deliveryId) >= 0 ||
      match.indexOf(event.supportTicketId) >= 0;
  }

  function refresh() {
    var seq = ++requested;
    return fetch(window.location.href, { credentials: "same-origin", headers: { "X-Requested-With": "support-live" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        if (seq < applied) return;  // a newer refresh landed first
        applied = seq;
        var doc = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live-region]").forEach(function (region) {
          var fresh = doc.getElementById(region.id);
          if (fresh) region.innerHTML = fresh.innerHTML;
        });
        body.setAttribute("data-live-refreshed", String(Date.now()));
      })
      .catch(function () { /* the next event or reconnect tries again */ });
  }

  function connect() {
    state("connecting", "connecting…");
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + path);
    var steady = null;
    socket.onopen = function () {
      // the backoff starts again once the socket has stayed open a while (a server closing it
      // at once, 1012 or 1013, is not met every second)
      steady = setTimeout(function () { retry = 1000; }, 10000);
      clearTimeout(timer);
      // "live" once the page holds everything up to the moment the socket opened.
      refresh().then(function () {
        if (socket.readyState === WebSocket.OPEN) state("live", "live");
      });
      if (pollMs > 0) {
        clearInterval(poller);
        poller = setInterval(function () {
          if (socket.readyState === WebSocket.OPEN && !document.hidden) refresh();
        }, pollMs);
      }
    };
    socket.onmessage = function (message) {
      var event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      if (!concerns(event)) return;
      clearTimeout(timer);
      timer = setTimeout(refresh, 300);  // a burst of events: one refresh
    };
    socket.onclose = function (close) {
      clearInterval(poller);
      if (close.code === 4429) {  // too many of this login's sockets open (SOCKET_MAX_PER_CREDENTIAL)
        state("offline", "too many tabs open, retrying in a minute");
        setTimeout(connect, 60000 * (0.75 + Math.random() * 0.5));
        return;
      }
      clearTimeout(steady);
      state("offline", "offline, retrying");
      setTimeout(connect, retry * (0.75 + Math.random() * 0.5));
      retry = Math.min(retry * 2, 30000);
    };
  }

  connect();
})();
