"""The server shell: WebSocket front door, connections, auth, settings, HTTP status, workers."""
