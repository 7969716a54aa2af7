"""Value rules that a model's form (the admin) and the API's field both apply, written once."""
from django.core.exceptions import ValidationError

NOT_POSITIVE = "Must be greater than 0."


def validate_positive(value) -> None:
    """Greater than 0 (a radius, a distance). None passes: the field's own null rule decides."""
    if value is not None and not value > 0:
        raise ValidationError(NOT_POSITIVE, code="not_positive")
