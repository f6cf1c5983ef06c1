"""ffkern."""
