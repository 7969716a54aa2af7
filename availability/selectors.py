from availability.models import DriverAvailabilityHistory


def availability_history_for_driver(*, driver_id):
    return DriverAvailabilityHistory.objects.filter(driver_id=driver_id)
