"""Dataset readers, one module per dataset family; each knows its official layout and splits."""
