"""JAX side: mesh set-up and (later) the table-driven pipeline executor."""
