"""State in Redis, shared by every process: records and key names, the connection, the store, typed
events with one subscription per process, and the protocols (``ports``) the planes take instead of the
store. Only a docstring, so that importing ``gateway.state.ports`` loads no Redis client."""
