"""State in Redis: the records, their keys, and the store that reads and writes them."""
