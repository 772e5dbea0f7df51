"""The data plane: parse each request head strictly, resolve its target, and stream bytes to the VM."""
