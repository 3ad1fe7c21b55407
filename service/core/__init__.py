"""Types and facts shared by the engine and the store, below both (neither imports the other)."""
