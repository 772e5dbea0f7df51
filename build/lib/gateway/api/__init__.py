"""Control-plane HTTP API (aiohttp): the spec's endpoints and what users need around them."""
