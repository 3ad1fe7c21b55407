"""Paging of the task registry: what a page may ask for (the routes' bounds, the store's guard)."""

MAX_PAGE = 1000  # tasks per page
# Largest page offset: exact in JSON numbers, and offset + limit stays inside Redis's int64.
MAX_OFFSET = 2**53
