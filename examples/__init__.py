"""Scripts that build the example models the demo and the tests use."""
