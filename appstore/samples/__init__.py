"""Sample apps built from real data, for the demo and the tests."""
