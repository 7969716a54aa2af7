"""Demo zones for `manage.py seed_demo`: a few Bengaluru neighbourhoods and a catch-all city
zone under them (overlaps resolve by priority). Idempotent: zones are found by name."""
from django.contrib.gis.geos import Polygon

from zones import services
from zones.models import DeliveryZone

# name: (priority, min drivers, offer expiry override, search radius override, ring of (lon, lat)).
# The demo keeps the platform defaults (30 s offers, 5 km radius) everywhere, so the demo city
# behaves as the SPEC describes; the overrides are there to be tried from the admin.
DEMO_ZONES = {
    "Central Business District": (1, 6, None, None, [
        (77.5850, 12.9640), (77.6040, 12.9590), (77.6250, 12.9660), (77.6230, 12.9850),
        (77.6030, 12.9880), (77.5860, 12.9820), (77.5850, 12.9640),
    ]),
    "Indiranagar": (2, 4, None, None, [
        (77.6300, 12.9620), (77.6550, 12.9640), (77.6560, 12.9890), (77.6330, 12.9900), (77.6300, 12.9620),
    ]),
    "Koramangala": (2, 4, None, None, [
        (77.6050, 12.9200), (77.6400, 12.9210), (77.6390, 12.9450), (77.6180, 12.9470), (77.6050, 12.9380),
        (77.6050, 12.9200),
    ]),
    "Jayanagar": (3, 3, None, None, [
        (77.5700, 12.9150), (77.6000, 12.9160), (77.5990, 12.9450), (77.5720, 12.9440), (77.5700, 12.9150),
    ]),
    "Malleshwaram": (3, 2, None, None, [
        (77.5550, 12.9900), (77.5800, 12.9910), (77.5790, 13.0150), (77.5560, 13.0140), (77.5550, 12.9900),
    ]),
    "Greater Bengaluru": (5, 10, None, None, [
        (77.4500, 12.8500), (77.7800, 12.8500), (77.7800, 13.1000), (77.4500, 13.1000), (77.4500, 12.8500),
    ]),
}


def ensure_demo_zones() -> list[DeliveryZone]:
    zones = []
    for name, (priority, min_drivers, expires, radius, ring) in DEMO_ZONES.items():
        zone = DeliveryZone.objects.filter(name=name).first()
        if zone is None:
            zone = services.zone_create(
                name=name, geometry=Polygon(ring, srid=4326), priority_level=priority,
                min_drivers_online=min_drivers, offer_expires_seconds=expires, search_radius_km=radius,
            )
        elif (zone.offer_expires_seconds, zone.search_radius_km) != (expires, radius):
            zone = services.zone_update(zone_id=zone.pk, offer_expires_seconds=expires, search_radius_km=radius)
        zones.append(zone)
    return zones
