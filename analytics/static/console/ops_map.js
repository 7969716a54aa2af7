/* The live ops map (/admin/map/): the state from the API, then /ws/ops/ with reconnect and backoff.
 *
 * Every marker's element carries data-driver-id / data-delivery-id (and data-lat/data-lon of
 * where it is drawn), for automation and the browser tests. The page's root carries
 * data-live-state: connecting | live | offline. No tiles needed: without OPS_MAP_TILE_URL, or
 * with no tile server reachable, the zones, drivers and deliveries show on a plain background. */
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("ops-map-config").textContent);
  const root = document.getElementById("ops-map-page");
  const statusText = document.getElementById("ops-map-status");
  const zoneSelect = document.getElementById("filter-zone");
  const OFFLINE_STATES = ["offline", "shift_ended"];
  const TERMINAL = ["delivered", "failed", "cancelled"];

  const map = L.map("ops-map", { preferCanvas: false }).setView(config.center, config.zoom);
  if (config.tileUrl) {
    L.tileLayer(config.tileUrl, { attribution: config.tileAttribution, maxZoom: 19 }).addTo(map);
  }
  const layers = { zones: L.layerGroup().addTo(map), routes: L.layerGroup().addTo(map), deliveries: L.layerGroup().addTo(map), drivers: L.layerGroup().addTo(map) };
  const drivers = new Map();     // id → {data, marker}
  const deliveries = new Map();  // id → {data, pickup, dropoff, route}
  const zones = new Map();       // id → {data, polygon}
  let truncated = {};            // the state left drivers or deliveries out (over the map's caps)

  function adminUrl(template, id) { return template.replace("00000000-0000-0000-0000-000000000000", id); }
  function esc(text) {
    const d = document.createElement("div");
    d.textContent = text == null ? "" : String(text);
    return d.innerHTML;
  }
  function when(iso) {
    if (!iso) return "—";
    const t = new Date(iso);
    return t.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }
  function setState(state, text) {
    root.dataset.liveState = state;
    statusText.textContent = text;
  }

  // ---------------------------------------------------------------- filters
  function checked(fieldsetId) {
    return new Set(Array.from(document.querySelectorAll(`#${fieldsetId} input:checked`)).map((i) => i.value));
  }
  function insideZone(lat, lon, zone) {  // in its outer ring and in none of its holes
    return insidePolygon(lat, lon, zone.polygon) && !(zone.holes || []).some((hole) => insidePolygon(lat, lon, hole));
  }
  function insidePolygon(lat, lon, ring) {
    let inside = false;
    for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
      const [yi, xi] = ring[i], [yj, xj] = ring[j];
      if ((yi > lat) !== (yj > lat) && lon < ((xj - xi) * (lat - yi)) / (yj - yi) + xi) inside = !inside;
    }
    return inside;
  }
  function zoneFilter() {
    const zone = zoneSelect.value ? zones.get(zoneSelect.value) : null;
    return zone ? zone.data : null;
  }
  function driverVisible(d) {
    const states = checked("filter-drivers");
    const state = OFFLINE_STATES.includes(d.availability) ? "offline" : d.availability;
    if (!states.has(state)) return false;
    const zone = zoneFilter();
    return !zone || insideZone(d.lat, d.lon, zone);
  }
  function deliveryVisible(d) {
    const kinds = checked("filter-deliveries");
    const kind = d.unassigned ? "unassigned" : (d.status === "in_transit" ? "picked_up" : d.status);
    if (!kinds.has(kind)) return false;
    const zone = zoneFilter();
    return !zone || d.zoneId === zone.zoneId;
  }
  function show(group, layer, visible) {
    if (visible && !group.hasLayer(layer)) group.addLayer(layer);
    if (!visible && group.hasLayer(layer)) group.removeLayer(layer);
  }
  function applyFilters() {
    drivers.forEach((entry) => { show(layers.drivers, entry.marker, driverVisible(entry.data)); stamp(entry.marker); });
    deliveries.forEach((entry) => {
      const visible = deliveryVisible(entry.data);
      show(layers.deliveries, entry.pickup, visible);
      show(layers.deliveries, entry.dropoff, visible);
      show(layers.routes, entry.route, visible);
      stamp(entry.pickup);
    });
    counts();
  }
  function counts() {
    const shownDrivers = Array.from(drivers.values()).filter((e) => layers.drivers.hasLayer(e.marker)).length;
    const shownDeliveries = Array.from(deliveries.values()).filter((e) => layers.deliveries.hasLayer(e.pickup)).length;
    const left = Object.entries(truncated).filter(([, cut]) => cut).map(([kind]) => kind);
    document.getElementById("ops-map-counts").textContent = `${shownDrivers} drivers, ${shownDeliveries} open deliveries shown`
      + (left.length ? ` (more ${left.join(" and ")} than the map holds: those at work and waiting longest are shown)` : "");
  }
  let countsTimer = null;
  function countsSoon() {  // once for a burst of events (the stale-driver job's hundreds), not once each
    if (countsTimer === null) countsTimer = setTimeout(() => { countsTimer = null; counts(); }, 100);
  }
  document.querySelectorAll("#filter-drivers input, #filter-deliveries input").forEach((i) => i.addEventListener("change", applyFilters));
  zoneSelect.addEventListener("change", () => {
    const zone = zoneFilter();
    if (zone) map.fitBounds(L.latLngBounds(zone.polygon), { padding: [20, 20] });
    applyFilters();
  });

  // ---------------------------------------------------------------- markers
  /** Writes the data attributes on a marker's element (it exists once the marker is on the map). */
  function stamp(marker) {
    const el = marker.getElement && marker.getElement();
    if (!el) return;
    for (const [key, value] of Object.entries(marker.options.dataset || {})) el.dataset[key] = value;
    const at = marker.getLatLng();
    el.dataset.lat = at.lat.toFixed(7);
    el.dataset.lon = at.lng.toFixed(7);
  }

  function driverCard(d) {
    return `<div class="ops-card" data-card-driver-id="${esc(d.driverId)}"><h3>${esc(d.name || "Driver")}</h3><dl>
      <dt>State</dt><dd>${esc(d.availability || "unknown")}</dd>
      <dt>Last fix</dt><dd>${esc(when(d.recordedAt))}</dd>
      <dt>Position</dt><dd>${d.lat.toFixed(5)}, ${d.lon.toFixed(5)}</dd></dl>
      <p><a href="${adminUrl(config.driverUrl, d.driverId)}">Open driver in the admin</a></p></div>`;
  }
  function deliveryCard(d) {
    const driver = d.driverId && drivers.get(d.driverId);
    return `<div class="ops-card" data-card-delivery-id="${esc(d.deliveryId)}"><h3>${esc(d.sellerOrderId)} · ${esc(d.storeName)}</h3><dl>
      <dt>Status</dt><dd>${esc(d.status)}${d.unassigned ? ` (unassigned, level ${esc(d.escalationLevel)})` : ""}</dd>
      <dt>Driver</dt><dd>${driver ? esc(driver.data.name) : (d.driverId ? esc(d.driverId) : "—")}</dd>
      <dt>Ready at</dt><dd>${esc(when(d.readyAt))}</dd></dl>
      <p><a href="${adminUrl(config.deliveryUrl, d.deliveryId)}">Open delivery in the admin</a></p></div>`;
  }

  function driverIcon(d) {
    return L.divIcon({ className: "", html: `<div class="ops-driver avail-${esc(d.availability || "offline")}"></div>`, iconSize: [16, 16], iconAnchor: [8, 8] });
  }
  // A driver's availability comes from three feeds: the state, `availability_changed` and the
  // position digest (read with a fix, sent up to a second later), each with the time it began
  // (`availabilityChangedAt`, `changedAt`). The newest wins whatever the order they arrive in, so
  // a lost `availability_changed` is mended by the driver's next fix. Without a time, the state
  // and the events are taken, the digest only for a driver not on the map.
  function micros(iso) {  // "…T09:10:11.123456Z" → microseconds since the epoch (Date keeps ms only)
    const m = iso ? /^(.*?)(?:\.(\d+))?Z$/.exec(iso) : null;
    const ms = m ? Date.parse(`${m[1]}Z`) : NaN;
    return Number.isNaN(ms) ? null : ms * 1000 + Number(`${m[2] || ""}000000`.slice(0, 6));
  }
  function takesAvailability(d, known, timeless) {
    if (!d.availability) return false;
    if (!known) return true;
    const at = micros(d.availabilityChangedAt), was = micros(known.availabilityChangedAt);
    if (at === null) return timeless;
    return was === null || at >= was;
  }
  // A position older than the one on the map (a state read before a digest the page applied:
  // it moved half the markers back to their fix of a few seconds before) is not taken.
  function takesPosition(d, known) {
    if (d.lat == null || !known || !known.recordedAt) return true;
    const at = micros(d.recordedAt), was = micros(known.recordedAt);
    return at === null || was === null || at >= was;
  }
  function upsertDriver(d, { timeless = true } = {}) {
    let entry = drivers.get(d.driverId);
    if (entry && !takesAvailability(d, entry.data, timeless)) {
      d = Object.assign({}, d);
      delete d.availability;
      delete d.availabilityChangedAt;
    }
    if (entry && !takesPosition(d, entry.data)) {
      d = Object.assign({}, d);
      ["lat", "lon", "heading", "recordedAt"].forEach((key) => delete d[key]);
    }
    if (!entry) {
      const marker = L.marker([d.lat, d.lon], {
        icon: driverIcon(d), title: d.name || d.driverId, keyboard: true, zIndexOffset: 500,
        dataset: { driverId: d.driverId, kind: "driver", availability: d.availability || "" },
      });
      marker.on("add", () => stamp(marker));
      entry = { data: d, marker };
      drivers.set(d.driverId, entry);
      marker.bindPopup(() => driverCard(entry.data));
    } else {
      const availabilityChanged = d.availability && d.availability !== entry.data.availability;
      entry.data = Object.assign({}, entry.data, d);
      entry.marker.setLatLng([entry.data.lat, entry.data.lon]);
      if (availabilityChanged) {
        entry.marker.options.dataset.availability = entry.data.availability;
        entry.marker.setIcon(driverIcon(entry.data));
      }
    }
    show(layers.drivers, entry.marker, driverVisible(entry.data));
    stamp(entry.marker);
  }

  function deliveryIcon(d) {
    const level = d.unassigned ? ` unassigned lvl-${d.escalationLevel || 0}` : "";
    return L.divIcon({ className: "", html: `<div class="ops-delivery status-${esc(d.status)}${level}"></div>`, iconSize: [14, 14], iconAnchor: [7, 7] });
  }
  const ended = new Set();  // deliveries a final event removed (a state read before it lists them open)
  function upsertDelivery(d) {
    let entry = deliveries.get(d.deliveryId);
    if (TERMINAL.includes(d.status)) { ended.add(d.deliveryId); removeDelivery(d.deliveryId); return; }
    if (!entry) {
      const pickup = L.marker([d.pickup.lat, d.pickup.lon], {
        icon: deliveryIcon(d), title: d.sellerOrderId, zIndexOffset: d.unassigned ? 400 : 0,
        dataset: { deliveryId: d.deliveryId, kind: "pickup", status: d.status },
      });
      const dropoff = L.marker([d.dropoff.lat, d.dropoff.lon], {
        icon: L.divIcon({ className: "", html: '<div class="ops-dropoff"></div>', iconSize: [10, 10], iconAnchor: [5, 5] }),
        title: `${d.sellerOrderId} drop-off`, dataset: { deliveryDropoffId: d.deliveryId, kind: "dropoff" },
      });
      const route = L.polyline([[d.pickup.lat, d.pickup.lon], [d.dropoff.lat, d.dropoff.lon]], { color: "#1565c0", weight: 2, dashArray: "4 4", opacity: 0.7 });
      pickup.on("add", () => stamp(pickup));
      dropoff.on("add", () => stamp(dropoff));
      entry = { data: d, pickup, dropoff, route };
      deliveries.set(d.deliveryId, entry);
      pickup.bindPopup(() => deliveryCard(entry.data));
      dropoff.bindPopup(() => deliveryCard(entry.data));
    } else {
      entry.data = Object.assign({}, entry.data, d);
      entry.pickup.options.dataset.status = entry.data.status;
      entry.pickup.setIcon(deliveryIcon(entry.data));
    }
    show(layers.deliveries, entry.pickup, deliveryVisible(entry.data));
    show(layers.deliveries, entry.dropoff, deliveryVisible(entry.data));
    show(layers.routes, entry.route, deliveryVisible(entry.data));
    stamp(entry.pickup);
  }
  function removeDelivery(id) {
    const entry = deliveries.get(id);
    if (!entry) return;
    layers.deliveries.removeLayer(entry.pickup);
    layers.deliveries.removeLayer(entry.dropoff);
    layers.routes.removeLayer(entry.route);
    deliveries.delete(id);
  }

  const HEALTH_COLOURS = { good: "#2e7d32", fair: "#ef6c00", poor: "#ba2121", unknown: "#607d8b" };
  function band(score) { return score == null ? "unknown" : score >= 70 ? "good" : score >= 40 ? "fair" : "poor"; }
  function upsertZone(z) {
    let entry = zones.get(z.zoneId);
    if (!entry) {
      const polygon = L.polygon([z.polygon, ...(z.holes || [])], { weight: 2, fillOpacity: 0.08 });
      entry = { data: z, polygon };
      zones.set(z.zoneId, entry);
      layers.zones.addLayer(polygon);
      polygon.bindPopup(() => `<div class="ops-card"><h3>${esc(entry.data.name)}</h3><dl>
        <dt>Health</dt><dd>${esc(entry.data.healthScore ?? "—")} / 100</dd>
        <dt>Drivers online</dt><dd>${esc(entry.data.driversOnline)} (min ${esc(entry.data.minDriversOnline)})</dd></dl>
        <p><a href="${adminUrl(config.zoneUrl, entry.data.zoneId)}">Open zone in the admin</a></p></div>`);
      const option = document.createElement("option");
      option.value = z.zoneId;
      option.textContent = z.name;
      zoneSelect.appendChild(option);
    } else {
      entry.data = Object.assign({}, entry.data, z);
    }
    const colour = HEALTH_COLOURS[band(entry.data.healthScore)];
    entry.polygon.setStyle({ color: colour, fillColor: colour });
    const el = entry.polygon.getElement();
    if (el) { el.dataset.zoneId = z.zoneId; el.dataset.health = band(entry.data.healthScore); }
  }

  // ---------------------------------------------------------------- state over the API
  let loadSeq = 0, stateShown = false, stateLoading = 0;  // (reads on their way: the first one's fallbacks wait for it)
  async function loadState() {
    const seq = ++loadSeq;
    stateLoading += 1;
    let state;
    try {
      const response = await fetch(config.stateUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`state: HTTP ${response.status}`);
      state = await response.json();
    } finally {
      stateLoading -= 1;
    }
    if (seq !== loadSeq) return;  // a newer load is on its way
    state.zones.forEach(upsertZone);
    state.drivers.forEach(upsertDriver);
    // A state is read a moment before it arrives: what the events said since is kept. A delivery
    // the state lacks goes, unless an event newer than the read put it on the map (created, or
    // changed, since); one a final event removed stays off (a final status is final); and a
    // delivery whose last applied change is newer than its row keeps that change.
    const open = new Set(state.deliveries.map((d) => d.deliveryId)), readAt = micros(state.generatedAt);
    Array.from(deliveries.entries())
      .filter(([id, entry]) => !open.has(id) && !(micros(entry.data.statusChangedAt) > readAt))
      .forEach(([id]) => removeDelivery(id));
    state.deliveries.forEach((d) => {
      if (ended.has(d.deliveryId)) return;
      const known = deliveries.get(d.deliveryId), row = Object.assign({}, d, { statusChangedAt: d.updatedAt });
      if (known && micros(known.data.statusChangedAt) > micros(d.updatedAt)) {
        ["status", "driverId", "statusChangedAt", "unassigned", "escalationLevel"].forEach((key) => delete row[key]);
      }
      upsertDelivery(row);
    });
    // (a later state is read after every final event that reached the page: only those it still
    // lists can come back, from a state read before them)
    Array.from(ended).filter((id) => !open.has(id)).forEach((id) => ended.delete(id));
    truncated = state.truncated || {};
    root.dataset.truncated = Object.values(truncated).some(Boolean) ? "true" : "false";
    counts();
    root.dataset.loadedAt = state.generatedAt;
    stateShown = true;
  }

  // ---------------------------------------------------------------- events from /ws/ops/
  const handlers = {
    driver_positions(e) {
      // The availability read with each fix: taken when newer than the one on the map (takesAvailability).
      e.drivers.forEach((p) => upsertDriver(Object.assign({ driverId: p.driverId, lat: p.lat, lon: p.lon, recordedAt: p.recordedAt },
        p.heading != null ? { heading: p.heading } : {},
        p.availability ? { availability: p.availability, availabilityChangedAt: p.availabilityChangedAt } : {}), { timeless: false }));
      counts();
    },
    availability_changed(e) {
      const entry = drivers.get(e.driverId);
      if (entry) upsertDriver({ driverId: e.driverId, availability: e.toState, availabilityChangedAt: e.changedAt });
      countsSoon();  // (a marker the filters now hide or show: the line said 500 shown while 407 were, for 15 s)
    },
    delivery_created(e) {
      upsertDelivery({ deliveryId: e.deliveryId, sellerOrderId: e.sellerOrderId, storeName: e.storeName, status: e.status,
        zoneId: e.zoneId, pickup: e.pickupLocation, dropoff: e.dropoffLocation, driverId: null, unassigned: false,
        escalationLevel: null, readyAt: e.createdAt, statusChangedAt: e.createdAt });
      counts();
    },
    delivery_status_changed(e) {
      // Two steps committed a few ms apart publish in either order: a change older than the one
      // on the map is not applied (it painted a delivery in transit as picked up again).
      const known = deliveries.get(e.deliveryId), at = micros(e.changedAt);
      if (known && at !== null && micros(known.data.statusChangedAt) > at) return;
      if (known || TERMINAL.includes(e.status)) {
        upsertDelivery({ deliveryId: e.deliveryId, status: e.status, driverId: e.driverId, statusChangedAt: e.changedAt,
          unassigned: e.status === "ready" && known?.data.unassigned });
      } else {
        scheduleReload();
      }
      counts();
    },
    delivery_cancelled(e) { ended.add(e.deliveryId); removeDelivery(e.deliveryId); counts(); },
    unassigned_order_escalated(e) {
      if (deliveries.has(e.deliveryId)) upsertDelivery({ deliveryId: e.deliveryId, unassigned: true, escalationLevel: e.level });
      countsSoon();
    },
    zone_health_updated(e) {
      if (zones.has(e.zoneId)) upsertZone({ zoneId: e.zoneId, healthScore: e.metrics.healthScore, driversOnline: e.metrics.currentDriversOnline });
    },
  };
  let reloadTimer = null;
  function scheduleReload() {  // an event about something not on the map yet: fetch the state again, at most once a second
    if (reloadTimer) return;
    reloadTimer = setTimeout(() => { reloadTimer = null; loadState().catch(() => {}); }, 1000);
  }

  let socket = null, attempt = 0;
  function connect() {
    setState(attempt ? "offline" : "connecting", attempt ? `Reconnecting (try ${attempt})…` : "Connecting…");
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}${config.socketPath}`);
    let steady = null;
    socket.onopen = () => {
      // the backoff starts again once the socket has stayed open a while: a server closing it
      // at once (1012, 1013: overloaded) is not met every second, each time reloading the state
      steady = setTimeout(() => { attempt = 0; }, 10000);
      // Joined before it opened (the server's order), so reloading now misses nothing.
      loadState().then(() => setState("live", "Live")).catch(() => setState("live", "Live (state reload failed)"));
    };
    socket.onmessage = (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch (err) { return; }
      const handle = handlers[event.type];
      if (handle) handle(event);
      root.dataset.lastEvent = event.type;
    };
    socket.onclose = (close) => {
      clearTimeout(steady);
      if (!stateShown && !stateLoading) loadState().catch(() => {});  // (the map is drawn while it tries again)
      if (close.code === 4401 || close.code === 4403) {
        setState("offline", "Signed out: reload the page to sign in again");
        return;
      }
      if (close.code === 4429) {  // too many of this login's sockets open (SOCKET_MAX_PER_CREDENTIAL)
        setState("offline", "Too many consoles open for this login: close some tabs (trying again in a minute)");
        setTimeout(connect, 60000 * (0.75 + Math.random() * 0.5));
        return;
      }
      attempt += 1;
      const delay = Math.min(30000, 1000 * 2 ** Math.min(attempt - 1, 5)) * (0.75 + Math.random() * 0.5);
      setState("offline", `Offline: reconnecting in ${Math.round(delay / 1000)} s`);
      setTimeout(connect, delay);
    };
  }

  // The state is read once the socket has joined (onopen), so the page reads it once, not once
  // before the socket and again when it opens (the state is the heavy read with a large fleet).
  // A socket that is slow to open, or fails, does not keep the map empty: the state is read
  // after 2 s without it, or when it closes first.
  connect();
  setTimeout(() => {
    if (stateShown || stateLoading || socket.readyState === WebSocket.OPEN) return;
    loadState().catch((err) => { if (!stateShown) setState("offline", `Could not load the map state (${err.message})`); });
  }, 2000);
})();
