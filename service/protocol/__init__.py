"""Request and response schemas (pydantic), shared by the routes in ``service/api`` and the
handlers below them. Nothing here knows about FastAPI routing."""
