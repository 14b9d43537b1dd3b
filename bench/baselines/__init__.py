"""The alternatives the gateway is measured against (bench only: nothing here is part of the product)."""
