"""The pure core: model vocabulary, state graph, rights, matching, expressions, URIs. No I/O here."""
