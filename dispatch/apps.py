from django.apps import AppConfig


class DispatchConfig(AppConfig):
    name = "dispatch"

    def ready(self):
        from common.metrics import register_scrape_collector
        from dispatch.metrics import DispatchCollector

        register_scrape_collector(DispatchCollector())
