"""One module per CLI command: register(subparsers) adds the parser and sets `func`."""
