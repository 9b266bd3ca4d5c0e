"""Stores: where jobs, their logs and notifications live (memory, SQLite, Redis)."""
