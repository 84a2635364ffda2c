"""How the real services are fetched, started and stopped on one machine."""
