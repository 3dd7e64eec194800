"""HTTP: `web` is the one framework-free boundary; the adapters serve it (Azure Functions, ASGI)."""
