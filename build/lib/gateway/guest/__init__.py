"""Programs that run inside VMs (the images' init programs), not in the gateway process."""
