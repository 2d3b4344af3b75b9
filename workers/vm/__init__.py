"""Code shipped to the VM over SSH (stdlib only): the detached runner."""
