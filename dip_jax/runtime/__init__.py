"""JAX side: mesh set-up, stage stacks, the table-driven pipeline executor and its compile cache."""
