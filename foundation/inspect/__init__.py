"""Seeing the data and the run: sample montages (`inspect shards`) and curves (`inspect run`)."""
