"""VM orchestration: use cases, lifetimes, and the VmDriver plug-ins."""
