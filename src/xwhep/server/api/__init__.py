"""HTTP routers: thin adapters from requests to the services."""
