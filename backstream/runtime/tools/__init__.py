"""Server-side tools: the registry, the built-in tools and the subprocess runner."""
