"""Code shared by both services and the client: protocol, config, logging, sampling, client."""
