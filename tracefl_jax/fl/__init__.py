"""Federated learning over stacked clients: one client's update, the client-axis strategies,
FedAvg, DP-FedAvg, and the round with its loop helper."""
