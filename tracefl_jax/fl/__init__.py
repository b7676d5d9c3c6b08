"""Federated learning over stacked clients: one client's update and its objective (client.py,
losses.py), the client-axis strategies, aggregation rules (aggregation.py, robust.py), DP-FedAvg,
the server optimizer (server.py), the algorithm (algorithm.py), the round loop (rounds.py) and
saved rounds (storage.py)."""
