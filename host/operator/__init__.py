"""What an operator sees: the account's gates and waiters (`status`), read through the
guest's public inspection API (`gates.py`, the one place that reads them)."""
