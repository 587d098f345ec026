"""Plain-torch implementations of every op: the test oracle and the CPU path."""
