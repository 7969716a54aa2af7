from django.apps import AppConfig


class AnalyticsConfig(AppConfig):
    name = "analytics"

    def ready(self):
        # Start-up wiring: the collector reads models, which exist only once apps are ready.
        from analytics.metrics import DispatchCollector
        from common.metrics import register_scrape_collector

        register_scrape_collector(DispatchCollector())
