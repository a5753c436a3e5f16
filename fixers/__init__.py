"""Repairs for saved adapters, planned before they are applied (`doctor fix`)."""
