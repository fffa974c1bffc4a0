"""One module per stage; each has `run(ctx) -> metrics` and imports heavy libraries inside."""
