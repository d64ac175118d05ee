"""Test helpers: tiny random models and weights folders, loopback process groups, device-traffic counting."""
