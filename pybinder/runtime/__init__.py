"""What runs inside a user's process. Nothing here imports :mod:`pybinder.broker`."""
