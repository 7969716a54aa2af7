/* The delivery page's small map: pickup, drop-off and the driver's latest position, from our
 * static Leaflet; tiles only if configured (and the page reads without them). */
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("delivery-map-data").textContent);
  const tiles = JSON.parse(document.getElementById("delivery-map-tiles").textContent);
  const points = [data.pickup, data.dropoff].concat(data.driver ? [data.driver.position] : []);
  // A view first: Leaflet places a marker only on a map that has one.
  const map = L.map("delivery-map", { scrollWheelZoom: false }).fitBounds(L.latLngBounds(points), { padding: [30, 30], maxZoom: 16 });
  if (tiles) L.tileLayer(tiles, { maxZoom: 19 }).addTo(map);
  function marker(at, html, kind, title) {
    const m = L.marker(at, { title, icon: L.divIcon({ className: "", html, iconSize: [14, 14], iconAnchor: [7, 7] }) }).addTo(map);
    const el = m.getElement();
    el.dataset.kind = kind;
    el.dataset.lat = at[0];
    el.dataset.lon = at[1];
    return m;
  }
  marker(data.pickup, '<div class="ops-delivery"></div>', "pickup", "Pickup");
  marker(data.dropoff, '<div class="ops-dropoff"></div>', "dropoff", "Drop-off");
  L.polyline([data.pickup, data.dropoff], { color: "#1565c0", weight: 2, dashArray: "4 4" }).addTo(map);
  if (data.driver) {
    marker(data.driver.position, '<div class="ops-driver avail-busy"></div>', "driver", data.driver.name);
  }
})();
