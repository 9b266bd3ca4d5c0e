"""The runtime: job store, log, models, upstream client and the embeddable API."""
