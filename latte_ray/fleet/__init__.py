"""Generation servers kept for the whole run (execution.keep_model_actors): the servers (servers.py), their
broker (broker.py) and the thin Ray Data clients that feed them (client.py)."""
