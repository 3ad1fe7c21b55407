"""HTTP layer: pydantic protocol, thin routers, error mapping, middleware."""
