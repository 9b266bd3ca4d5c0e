"""The runtime: the embeddable API, the supervision tree, and what it wires: stores, models,
tools and the server."""
