"""Settings modules: base (every environment) and test."""
