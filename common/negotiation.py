"""DRF's content negotiation, with a `?format=` that names no renderer of the view ignored, as
any other query parameter a view does not read is: DRF answered it 404 "Not found." for a URL
that exists (`/v2/deliveries?format=xml`; a fuzzing audit). A format the view renders still
selects it (`/v2/schema/?format=json`)."""
from rest_framework.negotiation import DefaultContentNegotiation


class ContentNegotiation(DefaultContentNegotiation):
    def filter_renderers(self, renderers, format):
        return [renderer for renderer in renderers if renderer.format == format] or renderers
