"""The server tier: API, scheduler, repository, event log."""
