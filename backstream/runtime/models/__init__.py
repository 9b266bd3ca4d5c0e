"""The model side: the OpenAI-compatible upstream client and the built-in offline models."""
