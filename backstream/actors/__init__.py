"""backstream's actors: the supervisor, the registry, job actors and watchers."""
