"""Launchers: turn a resolved run config into the processes that train it."""
