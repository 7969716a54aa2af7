"""The PostGIS database backend, registering its geometry adapters once per connection."""
