"""HTTP server and command line for the engine."""
