"""Server logic per object kind, working on a database connection inside one transaction."""
