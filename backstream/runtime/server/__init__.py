"""The server shell: WebSocket front door, connections, auth, settings, workers, and the HTTP
listener (the Responses API, health, metrics)."""
