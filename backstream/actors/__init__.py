"""backstream's actors: supervisor, registry, job actors, watchers, the notifier, and the ports they use."""
