"""Data: readers to canonical records, chat templates and loss masks, collators."""
